"""SHORTLIST masks: the contract's invariants, exact agreement with the plain-loop reference on awkward
inputs, the oracle's rows when the shortlist covers every candidate, the peak the halving search misses,
and the estimator name in the tracer's config."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import causal_counts, check_mask_invariants, make_qkv, mask_cases, mask_kwargs
from hypothesis import given, settings
from hypothesis import strategies as hs

import sparsetrace as sp
from sparsetrace.config import MaskConfig, TraceConfig
from sparsetrace.selection.blocks import chunked_tile_scores, key_blocks, query_blocks
from sparsetrace.selection.reference import shortlist_reference
from sparsetrace.selection.shortlist import (
    EXACT_TAIL,
    exact_tail_blocks,
    shortlist_select,
    shortlist_sizes,
    top_columns,
)

ALL = 10**6  # a shortlist longer than any candidate range: every row is the oracle's


def _diff(name, got, want):
    bad = (got != want).any(-1).nonzero()
    first = tuple(bad[0].tolist()) if len(bad) else None
    row = (got[first].tolist(), want[first].tolist()) if first else None
    return f"{name}: {len(bad)} rows differ; first at (b, h, i)={first}: got {row and row[0]}, want {row and row[1]}"


def _searched_rows(case, window=None) -> int:
    """How many query blocks run a search (more causal blocks than top_k): the tests must exercise some."""
    n = causal_counts(case["T"], case["S"], case["block_q"], case["block_k"])
    return sum(c > case["top_k"] for c in n) if window is None else len(n)


def _both(q, k, kw, *, window=None, size=None, z=3.0, max_elements=2**26):
    """(vectorised, loop reference) indices for the same knobs."""
    config = MaskConfig(estimator="shortlist", **kw)
    got = shortlist_select(q, k, config, window=window, size=size, z=z, max_elements=max_elements).indices
    want = shortlist_reference(q, k, config, window=window, size=size, z=z).indices
    return got, want


AWKWARD = [  # ragged T, S > T, GQA 6/2 and 4/1, batch 2, windows, rows with n <= top_k next to searched rows
    dict(B=2, Hkv=2, group=3, T=77, S=77, D=8, block_q=8, block_k=8, top_k=5, sink=1, local=1, seed=11),
    dict(B=1, Hkv=1, group=4, T=45, S=130, D=16, block_q=16, block_k=4, top_k=7, sink=2, local=1, seed=12),
    dict(B=2, Hkv=2, group=3, T=90, S=123, D=8, block_q=4, block_k=8, top_k=4, sink=0, local=2, seed=13),
    dict(B=2, Hkv=1, group=4, T=61, S=61, D=4, block_q=8, block_k=4, top_k=9, sink=1, local=0, seed=14),
    dict(B=1, Hkv=2, group=3, T=33, S=150, D=8, block_q=32, block_k=8, top_k=6, sink=1, local=1, seed=15),
    # m = 1 (k 3): the one-block rule's 4 * max(L, 2) candidates, fewer than the rows' up to 48
    dict(B=1, Hkv=2, group=3, T=200, S=200, D=8, block_q=8, block_k=4, top_k=3, sink=1, local=1, seed=16),
]


@pytest.mark.parametrize("window", [None, 13, 40])
@pytest.mark.parametrize("case", AWKWARD, ids=lambda c: f"T{c['T']}S{c['S']}g{c['group']}bk{c['block_k']}")
def test_matches_loop_reference_on_awkward_inputs(case, window):
    q, k = make_qkv(case)
    assert _searched_rows(case, window) > 0
    # slab 1: one query block a chunk, so a chunk's middle columns are often fewer than the shortlist is wide
    for z, size, score, stride, slab in ((3.0, None, "max", 1, 2**26), (0.0, None, "lse", 1, 2**26),
                                         (2.0, 3, "max", 2, 2**26), (3.0, 1, "lse", 3, 2**26),
                                         (3.0, None, "max", 1, 1), (2.0, 8, "lse", 1, 1)):
        kw = mask_kwargs(case, score=score, query_stride=stride)
        got, want = _both(q, k, kw, window=window, size=size, z=z, max_elements=slab)
        assert torch.equal(got, want), _diff(f"shortlist vs loop z={z} size={size} slab={slab} {kw}", got, want)


@settings(max_examples=25, deadline=None)
@given(case=mask_cases(max_T=64, max_extra=30, max_top_k=8, max_Hkv=2, max_group=3),
       kind=hs.sampled_from(["float32", "float64", "integers"]), z=hs.sampled_from([0.0, 3.0]),
       size=hs.sampled_from([None, 1, 4]), score=hs.sampled_from(["max", "lse"]),
       window=hs.sampled_from([None, 9, 33]))
def test_matches_loop_reference_random(case, kind, z, size, score, window):
    """Random shapes and knobs. "integers" draws q, k from {-2..2} with z = 0 and the max score: the
    pre-scores and block scores are exact in float32 and full of ties, so the tie rule (the lower block
    wins) is checked at both the shortlist and the final cut."""
    if kind == "integers":
        z, score = 0.0, "max"
    q, k = make_qkv(case, torch.float64 if kind == "float64" else torch.float32)
    if kind == "integers":
        q, k = q.mul(1.2).round().clamp(-2, 2), k.mul(1.2).round().clamp(-2, 2)
    got, want = _both(q, k, mask_kwargs(case, score=score), window=window, size=size, z=z)
    assert torch.equal(got, want), _diff(f"shortlist vs loop {kind} z={z} size={size}", got, want)


@settings(max_examples=30, deadline=None)
@given(case=mask_cases(), score=hs.sampled_from(["max", "lse"]))
def test_invariants(case, score):
    q, k = make_qkv(case)
    mask = sp.shortlist_mask(q, k, **mask_kwargs(case, score=score))
    assert (mask.block_q, mask.block_k) == (case["block_q"], case["block_k"])
    check_mask_invariants(f"shortlist {score}", mask.indices, B=case["B"], Hq=q.shape[1], T=case["T"],
                          S=case["S"], block_q=case["block_q"], block_k=case["block_k"], top_k=case["top_k"],
                          sink=case["sink"], local=case["local"])


@pytest.mark.parametrize("window", [None, 21])
@pytest.mark.parametrize("case", AWKWARD, ids=lambda c: f"T{c['T']}S{c['S']}g{c['group']}")
def test_equals_the_oracle_when_the_shortlist_covers_every_candidate(case, window):
    for dtype, score in ((torch.float64, "max"), (torch.float64, "lse"), (torch.float32, "max")):
        q, k = make_qkv(case, dtype)
        kw = mask_kwargs(case, score=score)
        got = shortlist_select(q, k, MaskConfig(**kw), window=window, size=ALL).indices
        want = sp.oracle_mask(q, k, window=window, **kw).indices
        assert torch.equal(got, want), _diff(f"shortlist(all) vs oracle {dtype} {kw}", got, want)


@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("T", [1, 5, 16, 200, 1000])
def test_input_tail_is_the_oracles_rows(T, window):
    """A decode step (T <= one query block) and the query blocks of a prefill that hold its last EXACT_TAIL
    tokens (the question, and the row that predicts the next token): the default shortlist holds every
    candidate, so those rows are the exact top-k, where a prefill row of the same keys keeps only C of them;
    the other rows stay the loop reference's. A chunk inside a prefill scores exactly only the tail's blocks
    it holds, so the rows do not depend on where chunks end."""
    torch.manual_seed(T)
    S, kw = 2000, dict(block_q=16, block_k=8, top_k=6, sink_blocks=1, local_blocks=1)
    q, k = torch.randn(1, 4, T, 16), torch.randn(1, 2, S, 16)
    config = MaskConfig(**kw)
    tail = sum(min(16 * (i + 1), T) - 1 >= T - EXACT_TAIL for i in range(math.ceil(T / 16)))  # hold the tail
    assert exact_tail_blocks(T, S, 16) == tail
    got = shortlist_select(q, k, config, window=window).indices
    oracle = sp.oracle_mask(q, k, window=window, **kw).indices
    assert torch.equal(got[:, :, -tail:], oracle[:, :, -tail:])
    assert torch.equal(got, shortlist_reference(q, k, config, window=window).indices)
    # the same queries as a chunk of a longer input whose tail starts 32 tokens past them: none exact
    inside = shortlist_select(q, k, config, window=window, input_end=S + 32 + EXACT_TAIL).indices
    assert torch.equal(inside, shortlist_reference(q, k, config, window=window, input_end=S + 32 + EXACT_TAIL).indices)
    assert torch.equal(inside[:, :, :-tail], got[:, :, :-tail])
    if T > 16:  # the tail reaches 40 tokens into the chunk: its last 3 blocks (of 16) are exact, no more
        end = S + EXACT_TAIL - 40
        part = shortlist_select(q, k, config, window=window, input_end=end).indices
        assert exact_tail_blocks(T, S, 16, end) == 3
        assert torch.equal(part[:, :, -3:], oracle[:, :, -3:]) and torch.equal(part[:, :, :-3], inside[:, :, :-3])
        assert torch.equal(part, shortlist_reference(q, k, config, window=window, input_end=end).indices)
    if T >= 200:  # the search is narrower than the oracle before the tail (what makes the tail rule matter)
        assert not torch.equal(inside[:, :, -tail:], oracle[:, :, -tail:])
    sized = shortlist_select(q, k, config, window=window, size=4).indices  # an explicit C is kept, tail too
    assert torch.equal(sized, shortlist_reference(q, k, config, window=window, size=4).indices)
    assert not torch.equal(sized[:, :, -1], got[:, :, -1])


def test_finds_a_peak_the_halving_search_misses():
    """Issue 16 in miniature. Key blocks carry a gentle ramp along e0 (block j scores about 0.1 j) and block 9
    holds one spike (30) among its 32 keys. STREAM judges the half [9, 16) by its centre block 12, so the
    ramp sends it right and the spike is never seen; the pooled variance of block 9 puts it on the
    shortlist, and the exact rescoring keeps it, as the oracle does."""
    torch.manual_seed(0)
    T, D, bk, needle = 1024, 16, 32, 9
    q = torch.randn(1, 1, T, D) * 0.01
    q[..., 0] = 1.0  # every query looks along e0
    k = torch.randn(1, 1, T, D) * 0.01
    k[0, 0, :, 0] = 0.1 * (torch.arange(T) // bk).float()  # the ramp
    k[0, 0, needle * bk + 5, 0] = 30.0  # the spike
    kw = dict(block_q=32, block_k=bk, top_k=4, sink_blocks=1, local_blocks=1)
    last = (T - 1) // 32
    oracle = sp.oracle_mask(q, k, **kw).indices[0, 0, last].tolist()
    stream = sp.stream_mask(q, k, **kw).indices[0, 0, last].tolist()
    short = sp.shortlist_mask(q, k, **kw).indices[0, 0, last].tolist()
    assert needle in oracle and needle not in stream, (oracle, stream)
    assert short == oracle


def test_shortlist_sizes_are_half_of_streams_tiles_and_at_least_its_first_level():
    """C = m * max(L, 2), L = ceil(log2(ceil(count / m))): STREAM's levels over the same candidates."""
    count = torch.tensor([0, 3, 14, 15, 28, 29, 56, 57, 126, 2046, 16382])
    m = 14
    want = [0, 3, 14, 15, 28, 28, 28, 42, 56, 112, 154]
    assert want[-3:] == [m * math.ceil(math.log2(math.ceil(c / m))) for c in (126, 2046, 16382)]
    assert shortlist_sizes(count, m).tolist() == want
    assert shortlist_sizes(count, m, 3).tolist() == [min(int(c), m) for c in count]  # never below m


def test_a_one_block_search_shortlists_four_candidates_a_level():
    """m = 1 (k 3): C = 4 * max(L, 2), L = ceil(log2(count)); twice STREAM's 2L tiles, the count caps it."""
    count = torch.tensor([0, 1, 2, 7, 8, 9, 62, 126, 16382])
    want = [0, 1, 2, 7, 8, 9, 24, 28, 56]
    assert want[-3:] == [4 * math.ceil(math.log2(c)) for c in (62, 126, 16382)]
    assert shortlist_sizes(count, 1).tolist() == want
    assert shortlist_sizes(count, 2).tolist() == [0, 1, 2, 4, 4, 6, 10, 12, 26]  # m > 1: m * max(L, 2)


@pytest.mark.parametrize("max_elements", [2**26, 3000])
def test_rescoring_scores_only_a_rows_first_sizes_candidates(max_elements):
    """``chunked_tile_scores(sizes=...)``, step 4 on the CPU: a row's first ``sizes`` scores equal those of
    scoring every candidate, the rest are ``-inf`` (rows of size 0 included), whether a run of equal sizes
    fits one chunk or is split (a 3000-float slab holds one query block of a few tiles)."""
    torch.manual_seed(5)
    B, Hq, Hkv, T, D, bq, bk, R = 1, 4, 2, 300, 8, 16, 16, 6
    config = MaskConfig(block_q=bq, block_k=bk, top_k=4)
    q, k = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D)
    q_blocks, q_pos, q_used = query_blocks(q, config, T)
    nQ = q_blocks.shape[2]
    ids = torch.randint(0, math.ceil(T / bk), (B, Hq, nQ, R))
    sizes = torch.tensor([0, 1, 1, 3, 3, 3, 6, 6, 2, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6])[:nQ]
    args = (q_blocks, q_pos, q_used, key_blocks(k, bk), ids, config, D**-0.5)
    full = chunked_tile_scores(*args, max_elements=2**26)
    got = chunked_tile_scores(*args, max_elements=max_elements, sizes=sizes)
    used = torch.arange(R) < sizes[:, None]  # [nQ, R]
    assert torch.equal(got[..., used], full[..., used])
    assert bool((got[..., ~used] == -math.inf).all()) and int((~used).sum()) > 0


def test_top_columns_breaks_ties_to_the_lower_column():
    s = torch.tensor([[1.0, 3.0, 3.0, -math.inf, 0.0, -0.0, 3.0, -2.0]])
    assert top_columns(s, 8).tolist() == [[1, 2, 6, 0, 4, 5, 7, 3]]


def test_bad_size_is_one_sentence():
    q, k = torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    with pytest.raises(sp.UsageError, match="size=0"):
        shortlist_select(q, k, MaskConfig(block_q=8, block_k=8, top_k=4), size=0)


def test_public_op_and_reference_impl():
    """``sp.shortlist_mask`` is ``select_blocks`` with the estimator named, and its impl="reference" is the
    loop; the trace config carries the name to the CLI's choices."""
    case = AWKWARD[0]
    q, k = make_qkv(case)
    kw = mask_kwargs(case)
    fast = sp.shortlist_mask(q, k, **kw).indices
    assert torch.equal(fast, sp.shortlist_mask(q, k, impl="reference", **kw).indices)
    assert torch.equal(fast, sp.select_blocks(q, k, MaskConfig(estimator="shortlist", **kw)).indices)
    assert not torch.equal(fast, sp.stream_mask(q, k, **kw).indices)  # a different search, not an alias
    assert sp.TraceConfig.of(estimator="shortlist", top_k=4).mask.estimator == "shortlist"


def test_default_is_shortlist_and_older_traces_read_as_stream():
    """SHORTLIST is the default selection; a manifest written before the estimator field (flat, or with a
    mask dict) was STREAM's and is read as STREAM's, while a recorded estimator is kept."""
    assert MaskConfig().estimator == "shortlist" and TraceConfig().mask.estimator == "shortlist"
    assert TraceConfig.from_dict({"top_k": 8}).mask.estimator == "stream"
    assert TraceConfig.from_dict({"mask": {"top_k": 8}, "chunk_size": 512}).mask.estimator == "stream"
    for estimator in ("shortlist", "oracle", "stream"):
        config = TraceConfig.of(estimator=estimator, top_k=8)
        assert TraceConfig.from_dict(dataclasses.asdict(config)) == config
