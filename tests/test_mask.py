"""STREAM and oracle masks: the contract's invariants, exact agreement with the plain-loop
references, inputs where the hierarchical search provably finds the exact answer, to_dense,
torch.compile, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DTYPES,
    causal_counts,
    check_mask_invariants,
    loop_token_mask,
    make_qkv,
    mask_cases,
    mask_kwargs,
)
from hypothesis import given, settings
from hypothesis import strategies as hs

import sparsetrace as sp

MASKS = {"stream": sp.stream_mask, "oracle": sp.oracle_mask}


def _diff(name, got, want):
    """Assertion message for index tensors: how many entries differ and the first differing row."""
    bad = (got != want).any(-1).nonzero()
    first = tuple(bad[0].tolist()) if len(bad) else None
    row = (got[first].tolist(), want[first].tolist()) if first else None
    return (
        f"{name}: {len(bad)} rows differ; first at (b, h, i)={first}: "
        f"got {row and row[0]}, want {row and row[1]}"
    )


@settings(max_examples=40)
@given(case=mask_cases(), dtype=hs.sampled_from(DTYPES), score=hs.sampled_from(["max", "lse"]))
def test_invariants(case, dtype, score):
    """Both masks: int32 [B, Hq, nQ, top_k], sorted unique rows, causal, -1 only at the end, forced
    blocks."""
    q, k = make_qkv(case, dtype)
    for name, fn in MASKS.items():
        mask = fn(q, k, **mask_kwargs(case, score=score))
        assert (mask.block_q, mask.block_k) == (case["block_q"], case["block_k"])
        check_mask_invariants(
            f"{name} {dtype} {score}",
            mask.indices,
            B=case["B"],
            Hq=q.shape[1],
            T=case["T"],
            S=case["S"],
            block_q=case["block_q"],
            block_k=case["block_k"],
            top_k=case["top_k"],
            sink=case["sink"],
            local=case["local"],
        )


@pytest.mark.parametrize("score", ["max", "lse"])
@pytest.mark.parametrize("query_stride", [1, 3])
@settings(max_examples=10)
@given(
    case=mask_cases(max_T=48, max_extra=24, max_top_k=8, max_Hkv=2, max_group=2),
    kind=hs.sampled_from(["float32", "float64", "integers"]),
)
def test_matches_loop_reference(case, kind, score, query_stride):
    """Vectorised stream/oracle == reference.loop_* exactly (float64 loops, one row at a time).

    "integers" draws q, k from {-2..2}: block scores are exact in float32 and full of ties, so the
    tie rule (lower block index wins) is checked too; only for "max", where ties are exact.
    """
    if kind == "integers" and score == "lse":
        kind = "float64"
    dtype = torch.float64 if kind == "float64" else torch.float32
    q, k = make_qkv(case, dtype)
    if kind == "integers":
        q, k = q.mul(1.2).round().clamp(-2, 2), k.mul(1.2).round().clamp(-2, 2)
    kw = mask_kwargs(case, score=score, query_stride=query_stride)
    got, want = sp.stream_mask(q, k, **kw).indices, sp.stream_mask(q, k, impl="reference", **kw).indices
    assert torch.equal(got, want), _diff(f"stream vs loop {kind} {kw}", got, want)
    got, want = sp.oracle_mask(q, k, **kw).indices, sp.oracle_mask(q, k, impl="reference", **kw).indices
    assert torch.equal(got, want), _diff(f"oracle vs loop {kind} {kw}", got, want)


ALIGNED = [  # whole query blocks, middle candidates entirely before each block's first query
    dict(
        B=2, Hkv=2, group=2, T=64, S=64, D=8, block_q=8, block_k=8, top_k=5, sink=1, local=1, seed=1
    ),
    dict(
        B=1, Hkv=1, group=3, T=64, S=96, D=8, block_q=8, block_k=4, top_k=7, sink=2, local=2, seed=2
    ),
    dict(
        B=1,
        Hkv=3,
        group=1,
        T=48,
        S=80,
        D=4,
        block_q=16,
        block_k=8,
        top_k=6,
        sink=0,
        local=2,
        seed=3,
    ),
    dict(
        B=2,
        Hkv=1,
        group=2,
        T=32,
        S=100,
        D=16,
        block_q=4,
        block_k=8,
        top_k=4,
        sink=1,
        local=1,
        seed=4,
    ),
]


@pytest.mark.parametrize("score", ["max", "lse"])
@pytest.mark.parametrize(
    "case", ALIGNED, ids=lambda c: f"T{c['T']}S{c['S']}bq{c['block_q']}bk{c['block_k']}"
)
def test_matches_loop_reference_aligned(case, score):
    """Block-aligned shapes (T a multiple of block_q, every middle candidate before the query
    block): the case where no pair is causally masked, which random ragged shapes rarely produce."""
    q, k = make_qkv(case)
    kw = mask_kwargs(case, score=score)
    got, want = sp.stream_mask(q, k, **kw).indices, sp.stream_mask(q, k, impl="reference", **kw).indices
    assert torch.equal(got, want), _diff(f"stream vs loop {kw}", got, want)
    got, want = sp.oracle_mask(q, k, **kw).indices, sp.oracle_mask(q, k, impl="reference", **kw).indices
    assert torch.equal(got, want), _diff(f"oracle vs loop {kw}", got, want)


@settings(max_examples=25)
@given(
    case=mask_cases(max_T=100, max_extra=40),
    extra=hs.integers(0, 3),
    score=hs.sampled_from(["max", "lse"]),
)
def test_everything_fits(case, extra, score):
    """top_k >= n for every query block: both masks keep exactly 0..n-1, whatever the scores."""
    n_kb = math.ceil(case["S"] / case["block_k"])
    case = dict(case, top_k=max(n_kb, case["sink"] + case["local"] + 1) + extra)
    q, k = make_qkv(case)
    counts = causal_counts(case["T"], case["S"], case["block_q"], case["block_k"])
    want = torch.tensor(
        [list(range(n)) + [-1] * (case["top_k"] - n) for n in counts], dtype=torch.int32
    )
    want = want.expand(case["B"], q.shape[1], -1, -1)
    for name, fn in MASKS.items():
        got = fn(q, k, **mask_kwargs(case, score=score)).indices
        assert torch.equal(got, want), _diff(f"{name} {score}", got, want)


@settings(max_examples=30)
@given(case=mask_cases(), dtype=hs.sampled_from(DTYPES), score=hs.sampled_from(["max", "lse"]))
def test_monotone_scores(case, dtype, score):
    """Block scores strictly monotone in the block index: STREAM must find the exact top-m.

    Key t is ``alpha * (t + 1) * e0`` (+ tiny noise); query head h is ``sign_h * e0``. For sign +1
    the block score increases with the block index, for -1 it decreases, in every query block: with
    "max" directly; with "lse" because one position moves a logit by ``scale * alpha >= 8 > log(bq *
    bk)``, more than the count of pairs can make up (this covers a partly visible diagonal block
    when local=0). alpha is a power of two, so the keys are exact in bf16/fp16. Halves are disjoint
    intervals, so their centres are ordered like the halves: the m best halves are always the m
    rightmost (leftmost), the survivors stay a contiguous suffix (prefix) of the candidates, and the
    search ends on the last (first) m middle blocks -- the oracle's answer. Signs differ within a
    GQA group, so the kv-head mapping is exercised too."""
    q, k = make_qkv(case)
    B, Hq, T, D = q.shape
    S, bk = case["S"], case["block_k"]
    g = torch.Generator().manual_seed(case["seed"] + 1)
    signs = torch.randint(0, 2, (Hq,), generator=g) * 2 - 1  # [Hq]
    alpha = 2.0 ** math.ceil(math.log2(8 / D**-0.5))  # 16 or 32; logits up to 32 * 211 stay exact
    k = 1e-3 * k
    k[..., 0] = alpha * torch.arange(1, S + 1, dtype=torch.float32)
    q = 1e-3 * q
    q[..., 0] = signs[None, :, None].float()
    q, k = q.to(dtype), k.to(dtype)

    sink, local, top_k = case["sink"], case["local"], case["top_k"]
    m = top_k - sink - local
    want = torch.full((B, Hq, math.ceil(T / case["block_q"]), top_k), -1, dtype=torch.int32)
    for i, n in enumerate(causal_counts(T, S, case["block_q"], bk)):
        for h in range(Hq):
            if n <= top_k:
                row = list(range(n))
            else:
                middle = range(n - local - m, n - local) if signs[h] > 0 else range(sink, sink + m)
                row = list(range(sink)) + list(middle) + list(range(n - local, n))
            want[:, h, i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    for name, fn in MASKS.items():
        got = fn(q, k, **mask_kwargs(case, score=score)).indices
        assert torch.equal(got, want), _diff(
            f"{name} {dtype} {score} signs={signs.tolist()}", got, want
        )


def _descend(lo: int, count: int, m: int, targets: list[int]) -> dict[int, int]:
    """Follow the search's partition towards one target per initial group; for every block that is
    the centre of a half on a target's path, the deepest level (1-based) at which it is."""
    level_of: dict[int, int] = {}
    groups = [(lo + g * count // m, lo + (g + 1) * count // m) for g in range(m)]
    assert all(a <= p < b for (a, b), p in zip(groups, targets))
    level = 0
    while any(b - a > 1 for a, b in groups):
        level += 1
        halves = []
        for (a, b), p in zip(groups, targets):
            mid = a + (b - a + 1) // 2
            half = (a, mid) if p < mid else (mid, b)
            level_of[(half[0] + half[1] - 1) // 2] = level
            halves.append(half)
        groups = halves
    return level_of


@settings(max_examples=30)
@given(
    data=hs.data(),
    m=hs.integers(1, 6),
    sink=hs.integers(0, 2),
    local=hs.integers(0, 2),
    block_k=hs.sampled_from([4, 8, 16]),
    block_q=hs.sampled_from([4, 8, 16, 32]),
    D=hs.sampled_from([4, 8, 16]),
    group=hs.integers(1, 3),
    score=hs.sampled_from(["max", "lse"]),
    dtype=hs.sampled_from(DTYPES),
)
def test_planted_paths(data, m, sink, local, block_k, block_q, D, group, score, dtype):
    """Planted blocks that the hierarchical search provably finds, chosen at random positions.

    One query block; its m initial groups each get one random target block p_g. Walking the search's
    partition towards p_g, the centre of the half holding p_g at level l gets score G*l (its deepest
    level if it is a centre more than once), every p_g gets the top score, all other blocks score 0.
    At level l each group's half holding p_g scores >= G*l, and every other half scores < G*l: its
    centre is either unplanted (0) or a centre only at earlier levels (a later path centre lies
    inside the kept half). So the m kept halves are exactly the ones holding the targets, in every
    group at once, and the search ends on {p_g}, which are also the exact top-m (the only blocks
    with the top score). A wrong split, centre, tie rule or top-m across groups shows up as a
    different block. Each query head of a GQA group reads its own key direction, so heads get
    independent targets; G is large enough that the log(count) term of "lse" cannot reorder levels.
    """
    count = data.draw(hs.integers(m + 1, 14 * m), label="middle candidates")
    n = sink + count + local
    S = data.draw(hs.integers((n - 1) * block_k + 1, n * block_k), label="S")
    T = data.draw(hs.integers(1, min(block_q, S)), label="T")
    B, Hkv = data.draw(hs.integers(1, 2), label="B"), data.draw(hs.integers(1, 2), label="Hkv")
    D = max(D, group)
    G = 64.0
    edges = [sink + g * count // m for g in range(m + 1)]

    k = torch.zeros(B, Hkv, S, D)
    want = torch.zeros(B, Hkv * group, 1, sink + m + local, dtype=torch.int32)
    for b in range(B):
        for kv in range(Hkv):
            for r in range(group):
                targets = [data.draw(hs.integers(edges[g], edges[g + 1] - 1)) for g in range(m)]
                level_of = _descend(sink, count, m, targets)
                top = max(level_of.values(), default=0) + 2
                for j, level in level_of.items():
                    k[b, kv, j * block_k : (j + 1) * block_k, r] = G * level
                for j in targets:
                    k[b, kv, j * block_k : (j + 1) * block_k, r] = G * top
                row = list(range(sink)) + targets + list(range(n - local, n))
                want[b, kv * group + r, 0] = torch.tensor(row, dtype=torch.int32)
    seed = data.draw(hs.integers(0, 2**31 - 1), label="seed")
    noise = torch.Generator().manual_seed(seed)
    k = k + 1e-3 * torch.randn(k.shape, generator=noise)
    q = 1e-3 * torch.randn(B, Hkv * group, T, D, generator=noise)
    for h in range(Hkv * group):
        q[:, h, :, h % group] = 1.0
    q, k = q.to(dtype), k.to(dtype)
    kw = dict(
        block_q=block_q,
        block_k=block_k,
        top_k=sink + m + local,
        sink_blocks=sink,
        local_blocks=local,
    )
    for name, fn in MASKS.items():
        got = fn(q, k, score=score, **kw).indices
        assert torch.equal(got, want), _diff(f"{name} {dtype} {score} n={n} {kw}", got, want)


@settings(max_examples=20)
@given(case=mask_cases(max_T=100, max_extra=40))
def test_all_ties_keep_lowest(case):
    """Zero keys: every "max" block score ties at 0, so both keep the first m middle blocks."""
    q, k = make_qkv(case)
    k = torch.zeros_like(k)
    local, top_k = case["local"], case["top_k"]
    for name, fn in MASKS.items():
        rows = fn(q, k, **mask_kwargs(case)).indices.tolist()
        for i, n in enumerate(
            causal_counts(case["T"], case["S"], case["block_q"], case["block_k"])
        ):
            want = (
                list(range(n))
                if n <= top_k
                else list(range(top_k - local)) + list(range(n - local, n))
            )
            want += [-1] * (top_k - len(want))
            for b, per_head in enumerate(rows):
                for h, blocks in enumerate(per_head):
                    assert blocks[i] == want, (
                        f"{name} [b={b}, h={h}, i={i}] n={n}: {blocks[i]} != {want}"
                    )


@settings(max_examples=15)
@given(case=mask_cases(max_T=64, max_extra=30, max_Hkv=2, max_group=2))
def test_to_dense_matches_loop(case):
    """to_dense(T, S) == a token mask built from the indices with plain loops (kept, causal)."""
    q, k = make_qkv(case)
    mask = sp.stream_mask(q, k, **mask_kwargs(case))
    got = mask.to_dense(case["T"], case["S"])
    want = loop_token_mask(mask.indices, case["block_q"], case["block_k"], case["T"], case["S"])
    assert got.dtype == torch.bool and got.shape == want.shape, (got.dtype, tuple(got.shape))
    bad = (got != want).nonzero()
    assert len(bad) == 0, f"{len(bad)} token entries differ, first (b, h, t, s) = {bad[0].tolist()}"
    with pytest.raises(ValueError, match="query blocks"):
        mask.to_dense(case["T"] + case["block_q"], case["S"] + case["block_q"])


@pytest.mark.slow
def test_torch_compile():
    """torch.compile(stream_mask) gives the same indices as eager on one small ragged GQA case."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 70, 16, generator=g), torch.randn(1, 2, 90, 16, generator=g)
    kw = dict(block_q=8, block_k=8, top_k=6, sink_blocks=1, local_blocks=1)
    compiled = torch.compile(sp.stream_mask, fullgraph=False)
    got, want = compiled(q, k, **kw).indices, sp.stream_mask(q, k, **kw).indices
    assert torch.equal(got, want), _diff("compiled vs eager", got, want)


def _bad(**over):
    q, k = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8)
    kw = dict(block_q=4, block_k=4, top_k=4, sink_blocks=1, local_blocks=1)
    args = dict(q=q, k=k, **kw)
    args.update(over)
    return args


BAD_INPUTS = {
    "q rank 3": (
        _bad(q=torch.randn(4, 8, 8)),
        r"q and k must be \[B, H, T, D\].*got shapes \(4, 8, 8\)",
    ),
    "k rank 5": (_bad(k=torch.randn(1, 2, 8, 8, 1)), r"must be \[B, H, T, D\]"),
    "Hq not multiple": (
        _bad(k=torch.randn(1, 3, 8, 8)),
        r"4 query heads are not a multiple of 3 kv heads",
    ),
    "top_k too small": (_bad(top_k=2), r"top_k=2 leaves no room.*sink_blocks \+ local_blocks = 2"),
    "block_q zero": (_bad(block_q=0), r"block_q=0 must be a positive integer"),
    "block_k negative": (_bad(block_k=-4), r"block_k=-4 must be a positive integer"),
    "sink negative": (_bad(sink_blocks=-1), r"sink_blocks=-1 must be a non-negative"),
    "query_stride zero": (_bad(query_stride=0), r"query_stride=0 must be a positive"),
    "unknown score": (_bad(score="mean"), r"score='mean' is not one of"),
    "devices differ": (
        _bad(k=torch.randn(1, 2, 8, 8, device="meta")),
        r"q is on cpu and k on meta",
    ),
    "head dims differ": (_bad(k=torch.randn(1, 2, 8, 4)), r"must share batch and head dim"),
    "batch differs": (_bad(k=torch.randn(2, 2, 8, 8)), r"must share batch and head dim"),
    "T > S": (_bad(k=torch.randn(1, 2, 7, 8)), r"T <= S.*got T=8, S=7"),
    "T == 0": (_bad(q=torch.randn(1, 4, 0, 8)), r"need 0 < T <= S"),
}


@pytest.mark.parametrize("fn", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("args, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(fn, args, message):
    with pytest.raises(ValueError, match=message):
        fn(**args)


@pytest.mark.parametrize("window", [24, 57, 100])
@pytest.mark.parametrize("score", ["max", "lse"])
def test_sliding_window_matches_loop_reference(window, score):
    """Sliding-window layers (Gemma 3): candidates are the blocks the window reaches, no forced sinks;
    the vectorised search and the exact oracle equal their loop references, and every kept block is
    reachable by some query of its block."""
    torch.manual_seed(window)
    q, k = torch.randn(2, 4, 230, 8), torch.randn(2, 2, 262, 8)
    kw = dict(block_q=8, block_k=8, top_k=5, sink_blocks=1, local_blocks=1, score=score, window=window)
    fast = sp.stream_mask(q, k, **kw).indices
    exact = sp.oracle_mask(q, k, **kw).indices
    assert torch.equal(fast, sp.stream_mask(q, k, impl="reference", **kw).indices)
    assert torch.equal(exact, sp.oracle_mask(q, k, impl="reference", **kw).indices)
    dense = sp.BlockMask(fast, 8, 8).to_dense(230, 262, window)  # [B, H, T, S]
    T, S = 230, 262
    first = torch.arange(0, T, 8) + (S - T)
    for i, f in enumerate(first.tolist()):
        row = fast[0, 0, i]
        for b in row[row >= 0].tolist():
            assert (b + 1) * 8 - 1 > f - window, f"block {b} lies wholly outside the window of block {i}"
    assert dense.any(-1).all(), "a query sees no key at all"
