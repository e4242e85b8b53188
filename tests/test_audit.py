"""The audit of a trace: exact missed mass against a float64 dense softmax built here, the oracle rows
against oracle_mask, recall by sets, the estimator exact when its sample is the whole unkept set and
covering the truth on random inputs, the row sampler's determinism and stratification."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, causal_counts, make_qkv, mask_cases, mask_kwargs
from hypothesis import given, settings
from hypothesis import strategies as hs

import sparsetrace as sp
from sparsetrace.audit.estimate import estimate_missed, kept_logsumexp
from sparsetrace.audit.exact import audit_query_blocks, audit_rows, droppable_query_blocks
from sparsetrace.config import MaskConfig


def dense_missed_f64(q, k, indices, block_q, block_k, window=None):
    """Missed mass of every row ``[B, Hq, nQ]`` from the full float64 softmax, loops over rows."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    kk = k.double()[:, [h // (Hq // Hkv) for h in range(Hq)]]  # [B, Hq, S, D]
    logits = q.double() @ kk.transpose(-1, -2) * D**-0.5  # [B, Hq, T, S]
    pos_q = torch.arange(T)[:, None] + (S - T)
    pos_k = torch.arange(S)[None, :]
    allowed = pos_k <= pos_q
    if window is not None:
        allowed &= pos_k > pos_q - window
    p = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)
    nQ = indices.shape[2]
    out = torch.zeros(B, Hq, nQ, dtype=torch.float64)
    rows = indices.tolist()
    for b in range(B):
        for h in range(Hq):
            for i in range(nQ):
                t0, t1 = i * block_q, min((i + 1) * block_q, T)
                kept = torch.zeros(S, dtype=torch.bool)
                for j in rows[b][h][i]:
                    if j >= 0:
                        kept[j * block_k:(j + 1) * block_k] = True
                out[b, h, i] = (1 - p[b, h, t0:t1][:, kept].sum(-1)).mean()
    return out


def _random_rows(indices, case, seed):
    """Valid rows that ignore the contract (no forced blocks): what an edited mask may hold."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full_like(indices, -1)
    counts = causal_counts(case["T"], case["S"], case["block_q"], case["block_k"])
    for b in range(indices.shape[0]):
        for h in range(indices.shape[1]):
            for i, n in enumerate(counts):
                pick = torch.randperm(n, generator=g)[:int(torch.randint(1, indices.shape[3] + 1, (1,),
                                                                         generator=g))]
                out[b, h, i, :len(pick)] = pick.sort().values.int()
    return out


@settings(max_examples=30)
@given(case=mask_cases(max_T=120, max_extra=50), window=hs.sampled_from([0, 0, 7, 25, 64]),
       which=hs.sampled_from(["stream", "random"]))
def test_exact_missed_mass_against_float64(case, window, which):
    """Ragged T, S > T, GQA, batch 2, sliding window, contract or arbitrary rows; chunked key pass."""
    q, k = make_qkv(case)
    window = window or None  # 0: a global layer
    kw = mask_kwargs(case)
    indices = sp.stream_mask(q, k, **kw, window=window).indices
    if which == "random":
        indices = _random_rows(indices, case, case["seed"])
    nQ = indices.shape[2]
    rows = torch.randperm(nQ, generator=torch.Generator().manual_seed(case["seed"]))[:max(1, nQ // 2)]
    missed, recall = audit_rows(q, k, indices, rows, MaskConfig(**kw), window=window, max_elements=3000)
    want = dense_missed_f64(q, k, indices, case["block_q"], case["block_k"], window)[:, :, rows]
    assert missed.shape == recall.shape == (case["B"], q.shape[1], len(rows))
    assert_close(f"missed {which} window={window}", missed, want, atol=2e-5)


@settings(max_examples=30)
@given(case=mask_cases(max_T=120, max_extra=50), window=hs.sampled_from([0, 0, 9, 40]),
       score=hs.sampled_from(["max", "lse"]))
def test_oracle_rows_equal_oracle_mask_and_recall_by_sets(case, window, score):
    """The audit's exact block top-k is oracle_mask's row; recall = |kept & O| / |O| over the oracle's
    searched (non-forced) picks, NaN where the row keeps every candidate."""
    q, k = make_qkv(case)
    window = window or None  # 0: a global layer
    kw = mask_kwargs(case, score=score)
    oracle = sp.oracle_mask(q, k, **kw, window=window).indices
    stream = sp.stream_mask(q, k, **kw, window=window).indices
    nQ = oracle.shape[2]
    rows = torch.arange(nQ)
    _, recall_o, o_rows = audit_rows(q, k, oracle, rows, MaskConfig(**kw), window=window, return_oracle=True)
    assert torch.equal(o_rows, oracle), "audit oracle rows differ from oracle_mask"
    _, recall_s = audit_rows(q, k, stream, rows, MaskConfig(**kw), window=window)
    bq, bk = case["block_q"], case["block_k"]
    sinks = case["sink"] if window is None else 0
    for b in range(case["B"]):
        for h in range(q.shape[1]):
            for i in range(nQ):
                first = i * bq + case["S"] - case["T"]
                last = min((i + 1) * bq, case["T"]) - 1 + case["S"] - case["T"]
                n = last // bk + 1
                lo = 0 if window is None else max(0, (first - window + 1) // bk)
                forced = set(range(lo, lo + sinks)) | set(range(n - case["local"], n))
                picks = {j for j in oracle[b, h, i].tolist() if j >= 0} - forced
                if n - lo <= case["top_k"] or not picks:
                    assert math.isnan(recall_s[b, h, i]) and math.isnan(recall_o[b, h, i])
                    continue
                kept = set(stream[b, h, i].tolist())
                assert recall_s[b, h, i].item() == pytest.approx(len(kept & picks) / len(picks))
                assert recall_o[b, h, i].item() == 1.0


@settings(max_examples=25)
@given(case=mask_cases(max_T=120, max_extra=50), window=hs.sampled_from([0, 0, 9, 40]),
       proposal=hs.sampled_from(["key", "block"]))
def test_estimate_is_exact_when_the_sample_covers_every_unkept_key(case, window, proposal):
    """samples >= unkept blocks * block_k: the sample is the whole unkept set, low == estimate == high ==
    the exact missed mass (and 0 where nothing is unkept)."""
    q, k = make_qkv(case)
    window = window or None  # 0: a global layer
    kw = mask_kwargs(case)
    indices = sp.stream_mask(q, k, **kw, window=window).indices
    n_kb = math.ceil(case["S"] / case["block_k"])
    samples = 8 * math.ceil(n_kb * case["block_k"] / 8)
    est = estimate_missed(q, k, indices, MaskConfig(**kw), window=window, samples=samples, proposal=proposal)
    want = dense_missed_f64(q, k, indices, case["block_q"], case["block_k"], window)
    assert est.shape == (*indices.shape[:3], 3) and est.dtype == torch.float32
    for slot, name in enumerate(("estimate", "low", "high")):
        assert_close(f"{name} ({proposal}, window={window})", est[..., slot], want, atol=2e-5)


@pytest.mark.parametrize("proposal", ["key", "block"])
def test_estimate_interval_covers_the_truth_on_random_inputs(proposal):
    """Heavy-ish random logits, 32 keys a row out of hundreds: the 90 % interval holds the exact missed
    mass on most rows, the estimate is close, and rows that keep everything are exactly 0."""
    g = torch.Generator().manual_seed(0)
    B, Hkv, group, T, S, D = 2, 2, 2, 300, 360, 16
    q = torch.randn(B, Hkv * group, T, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g) * 1.5
    kw = dict(block_q=8, block_k=8, top_k=4, sink_blocks=1, local_blocks=1)
    indices = sp.stream_mask(q, k, **kw).indices
    est = estimate_missed(q, k, indices, MaskConfig(**kw), samples=32, proposal=proposal)
    want = dense_missed_f64(q, k, indices, 8, 8).float()
    drop = droppable_query_blocks(T, S, MaskConfig(**kw))
    cover = ((est[..., 1] <= want + 1e-6) & (want <= est[..., 2] + 1e-6))[:, :, drop].float().mean().item()
    err = (est[..., 0] - want)[:, :, drop].abs().median().item()
    print(f"{proposal}: coverage {cover:.3f}, median |err| {err:.4f}, truth mean {want.mean():.3f}")
    assert cover >= 0.85 and err < 0.02
    assert (est[:, :, ~drop] == 0).all()
    assert (est[..., 1] <= est[..., 0]).all() and (est[..., 0] <= est[..., 2]).all()


def test_estimate_with_given_kept_lse_matches_recomputed():
    q, k = make_qkv(dict(B=1, Hkv=1, group=3, T=70, S=90, D=8, seed=3))
    config = MaskConfig(block_q=8, block_k=8, top_k=4)
    indices = sp.stream_mask(q, k, config).indices
    lse = kept_logsumexp(q, k, indices, config)
    _, attention_lse = sp.sparse_attention(q, k, k, sp.stream_mask(q, k, config), return_lse=True)
    assert_close("kept lse vs the attention's", lse, attention_lse, atol=1e-5)
    a = estimate_missed(q, k, indices, config, samples=16, seed=5)
    b = estimate_missed(q, k, indices, config, samples=16, seed=5, kept_lse=lse)
    assert torch.equal(a, b)


def test_estimate_draws_do_not_depend_on_chunking():
    """A row draws the same keys whether it is estimated alone, in a chunk of a prefill, or inside a
    larger batch of rows: the trace is the same whatever the chunk size."""
    q, k = make_qkv(dict(B=1, Hkv=2, group=2, T=256, S=256, D=8, seed=7))
    config = MaskConfig(block_q=16, block_k=16, top_k=4)
    whole = estimate_missed(q, k, sp.stream_mask(q, k, config).indices, config, samples=16)
    for first in (64, 160):  # the last 256 - first queries as one prefill chunk over every key
        part = q[:, :, first:]
        est = estimate_missed(part, k, sp.stream_mask(part, k, config).indices, config, samples=16,
                              first_query_block=first // 16, max_elements=2**12)
        assert torch.equal(est, whole[:, :, first // 16:])
    # the slab size (the GPU passes a larger one) only groups rows: same draws, the same numbers up to
    # float32 summation order of the batched products
    indices = sp.stream_mask(q, k, config).indices
    small, large = (estimate_missed(q, k, indices, config, samples=16, proposal="block", max_elements=size)
                    for size in (2**10, 2**27))
    assert_close("estimate, small vs large slabs", small, large, atol=1e-6)


def test_block_proposal_scores_drawn_keys_the_same_either_way(monkeypatch):
    """The torch draw inside the drawn blocks scores every key with one product (up to SCORE_EVERY_KEY_MAX
    keys) or gathers the drawn blocks' keys (past it): in float64 both give the same draws, so the same
    estimate."""
    from sparsetrace.audit import estimate as est_module

    q, k = make_qkv(dict(B=2, Hkv=2, group=3, T=96, S=700, D=8, seed=11))
    q, k = q.double(), k.double() * 1.5
    config = MaskConfig(block_q=16, block_k=16, top_k=4)
    indices = sp.stream_mask(q, k, config, window=500).indices
    every = estimate_missed(q, k, indices, config, window=500, samples=16, proposal="block")
    monkeypatch.setattr(est_module, "SCORE_EVERY_KEY_MAX", 0)
    gathered = estimate_missed(q, k, indices, config, window=500, samples=16, proposal="block")
    assert (every[..., 2] > every[..., 1]).any()  # sampled rows, not only censuses
    assert_close("estimate, every key scored vs drawn blocks gathered", every, gathered, atol=1e-12)


def test_sampler_is_seeded_and_stratified():
    rows = audit_query_blocks(200, 10, seed=1, layer=3, first=20)
    assert torch.equal(rows, audit_query_blocks(200, 10, seed=1, layer=3, first=20))
    assert not torch.equal(rows, audit_query_blocks(200, 10, seed=1, layer=4, first=20))
    assert not torch.equal(rows, audit_query_blocks(200, 10, seed=2, layer=3, first=20))
    assert rows.dtype == torch.long and len(rows) == 10
    strata = torch.arange(11) * 180 // 10 + 20  # one draw in each of 10 equal strata of [20, 200)
    assert ((rows >= strata[:-1]) & (rows < strata[1:])).all(), rows
    assert torch.equal(audit_query_blocks(30, 50, first=25), torch.arange(25, 30))
    assert len(audit_query_blocks(30, 5, first=30)) == 0
    # over many seeds every block of the range is drawn, and none outside it
    seen = torch.cat([audit_query_blocks(40, 4, seed=s, first=8) for s in range(200)]).unique()
    assert torch.equal(seen, torch.arange(8, 40))


def test_droppable_query_blocks():
    T, S, bq, bk, top_k = 100, 130, 8, 16, 3
    counts = torch.tensor(causal_counts(T, S, bq, bk))
    config = MaskConfig(block_q=bq, block_k=bk, top_k=top_k, sink_blocks=0, local_blocks=0)
    assert torch.equal(droppable_query_blocks(T, S, config), counts > top_k)
    window = 40
    drop = droppable_query_blocks(T, S, config, window=window)
    first = torch.arange(len(counts)) * bq + S - T
    lo = torch.clamp((first - window + 1) // bk, min=0)
    assert torch.equal(drop, counts - lo > top_k)


def test_bad_arguments():
    q, k = make_qkv(dict(B=1, Hkv=1, group=1, T=20, S=20, D=8, seed=0))
    config = MaskConfig(block_q=8, block_k=8, top_k=2, sink_blocks=0)
    indices = sp.stream_mask(q, k, config).indices
    with pytest.raises(ValueError, match="proposal"):
        estimate_missed(q, k, indices, config, proposal="uniform")
    with pytest.raises(ValueError, match="samples"):
        estimate_missed(q, k, indices, config, samples=1, proposal="block")


def _synthetic_trace(r: int, seed: int = 0) -> sp.Trace:
    """An in-memory trace with an audit of r query blocks (random exact values, some NaN recall) and a
    per-row estimate."""
    g = torch.Generator().manual_seed(seed)
    L, H, nQ, k = 3, 4, 12, 2
    indices = torch.arange(k, dtype=torch.int32).expand(L, H, nQ, k).contiguous()
    missed = torch.rand(L, H, r, generator=g) ** 2
    recall = torch.rand(L, H, r, generator=g).masked_fill(torch.rand(L, H, r, generator=g) < 0.2, math.nan)
    est = torch.rand(L, H, nQ, 1, generator=g).expand(L, H, nQ, 3) + torch.tensor([0.0, -0.1, 0.1])
    return sp.Trace.from_arrays(indices, torch.ones(L, H, nQ, k), block_q=4, block_k=4,
                                tokens=torch.zeros(nQ * 4, dtype=torch.long), missed=est.clamp(0, 1),
                                audit={"query_block": torch.arange(nQ - r, nQ), "missed": missed,
                                       "recall": recall})


def test_summary_bootstrap_resamples_whole_query_blocks(monkeypatch):
    """audit_summary's intervals equal a plain loop over the bootstrap draws (every draw resamples the r
    audited query blocks, all layers and heads of a block together), however the draws are sliced; with a
    single audited block the interval is NaN (nothing to resample) and the printed summary says so."""
    from sparsetrace.analysis import audit as analysis

    def loop(values, statistic, g):  # the reference: one draw at a time, float64
        r = values.shape[-1]
        draws = torch.randint(0, r, (analysis.BOOTSTRAP, r), generator=g)
        stats = torch.tensor([statistic(values[..., d]) for d in draws], dtype=torch.float64)
        tail = (1 - analysis.LEVEL) / 2
        return [statistic(values), torch.quantile(stats, tail).item(), torch.quantile(stats, 1 - tail).item()]

    def mean(x):
        return torch.nanmean(x.double()).item()

    def p90(x):
        return torch.quantile(x.double().flatten(), 0.9).item()

    trace = _synthetic_trace(r=7)
    audit = trace.audit()
    g = torch.Generator().manual_seed(0)
    want = {"missed_mean": loop(audit["missed"], mean, g), "missed_p90": loop(audit["missed"], p90, g),
            "recall_mean": loop(audit["recall"], mean, g)}
    summary = analysis.audit_summary(trace)
    monkeypatch.setattr(analysis, "_BOOTSTRAP_ELEMENTS", 1000)  # a few draws per slice
    sliced = analysis.audit_summary(trace)
    for key, value in want.items():
        print(key, value, summary[key])
        assert summary[key] == pytest.approx(value, abs=1e-12) and sliced[key] == pytest.approx(value, abs=1e-12)
        assert value[1] < value[0] < value[2]
    assert "90% CI" in analysis.format_summary(summary)[1]

    one = analysis.audit_summary(_synthetic_trace(r=1))
    exact = _synthetic_trace(r=1).audit()["missed"].double()
    assert one["missed_mean"][0] == pytest.approx(exact.mean().item(), abs=1e-12)
    assert one["missed_p90"][0] == pytest.approx(torch.quantile(exact.flatten(), 0.9).item(), abs=1e-12)
    for key in ("missed_mean", "missed_p90", "recall_mean"):
        assert math.isnan(one[key][1]) and math.isnan(one[key][2])
    lines = analysis.format_summary(one)
    print("\n".join(lines))
    assert "nan" not in " ".join(lines) and "no CI: one audited query block" in lines[1]


def _hidden_heavy_key(heads: int = 32, seed: int = 0):
    """One query block (8 queries near 4 e_0) over 100 key blocks of 8 that keeps the sink and local
    blocks (keys ~3 e_0). Among the unkept keys (~-2 e_0), each head hides one heavy key (5.5 e_0) in a
    block whose other keys are -4 e_0: that block's mean key ranks it below every other block, yet the
    heavy key holds about 2/3 of the unkept mass. Returns q, k, indices, config."""
    g = torch.Generator().manual_seed(seed)
    T, S, D, bk = 8, 800, 16, 8
    q = 0.1 * torch.randn(1, heads, T, D, generator=g)
    q[..., 0] += 4.0
    k = 0.3 * torch.randn(1, heads, S, D, generator=g)
    k[..., 0] += -2.0
    k[:, :, :bk, 0] += 5.0  # the sink block and the local (last) block: kept
    k[:, :, S - bk:, 0] += 5.0
    hide = torch.randint(2, S // bk - 2, (heads,), generator=g)
    for h, b in enumerate(hide.tolist()):
        k[0, h, b * bk:(b + 1) * bk, 0] = -4.0
        k[0, h, b * bk + 3, 0] = 5.5
    config = MaskConfig(block_q=8, block_k=bk, top_k=3, sink_blocks=1, local_blocks=1)
    indices = torch.tensor([0, S // bk - 1, -1], dtype=torch.int32).expand(1, heads, 1, 3).contiguous()
    return q, k, indices, config


def test_block_proposal_counts_a_heavy_block_in_its_exact_head(monkeypatch):
    """The block proposal scores a block by its pooled mean key plus BLOCK_Z standard deviations, so the
    block with one heavy key among weak ones ranks first and falls in the exact head: that block (2/3 of
    the unkept mass) is counted exactly and only the light tail is sampled, so the estimate is close and
    the interval narrow, and it holds the exact (float64) missed mass on most rows. Scored by the mean key
    alone without a head (the first rule: 16 blocks of 4 keys, mixture 0.25) the block is rarely drawn
    and the interval misses on most rows; with the head but no BLOCK_Z it is rarely in the head either."""
    from sparsetrace.audit import estimate as est_module

    q, k, indices, config = _hidden_heavy_key()
    want = dense_missed_f64(q, k, indices, 8, 8)[0, :, 0]  # [heads]

    def run(seeds=range(10)):
        est = torch.stack([estimate_missed(q, k, indices, config, samples=64, proposal="block", seed=seed)[0, :, 0]
                           for seed in seeds]).double()  # [seeds, heads, 3]
        cover = ((est[..., 1] <= want + 1e-6) & (want <= est[..., 2] + 1e-6)).double().mean().item()
        return cover, (est[..., 0] - want).abs().median().item(), (est[..., 2] - est[..., 1]).mean().item()

    cover, err, width = run()
    print(f"truth mean {want.mean():.3f}; coverage {cover:.3f}, median |err| {err:.5f}, mean width {width:.4f}")
    assert cover >= 0.85 and err < 0.002 and width < 0.02
    monkeypatch.setattr(est_module, "HEAD_BLOCKS", 0)  # sampled only: wider, still covers
    cover, err, width = run()
    print(f"no head: coverage {cover:.3f}, median |err| {err:.4f}, mean width {width:.4f}")
    assert cover >= 0.85 and width > 0.05
    monkeypatch.setattr(est_module, "BLOCK_Z", 0.0)
    monkeypatch.setattr(est_module, "BLOCK_MIX", 0.25)
    monkeypatch.setattr(est_module, "PER_BLOCK", 4)
    old, _, _ = run(range(3))
    monkeypatch.setattr(est_module, "HEAD_BLOCKS", 2)
    monkeypatch.setattr(est_module, "PER_BLOCK", 1)
    head_only, _, _ = run(range(3))
    print(f"mean key alone: coverage {old:.3f}; with the head: {head_only:.3f}")
    assert old < 0.5 and head_only < 0.5


@pytest.mark.parametrize("window", [None, 40])
def test_block_proposal_is_exact_when_the_head_holds_every_unkept_block(window):
    """At most HEAD_BLOCKS unkept blocks a row, more keys than samples (no census): the exact head is
    the whole unkept set, so low == estimate == high == the exact missed mass."""
    from sparsetrace.audit.estimate import HEAD_BLOCKS

    g = torch.Generator().manual_seed(1)
    B, Hkv, group, T, S, D, bk = 2, 2, 2, 40, 16 * (3 + HEAD_BLOCKS), 8, 16
    q, k = torch.randn(B, Hkv * group, T, D, generator=g), torch.randn(B, Hkv, S, D, generator=g) * 1.5
    config = MaskConfig(block_q=8, block_k=bk, top_k=3, sink_blocks=1, local_blocks=1)
    indices = sp.stream_mask(q, k, config, window=window).indices
    est = estimate_missed(q, k, indices, config, window=window, samples=8, proposal="block")
    want = dense_missed_f64(q, k, indices, 8, bk, window)
    assert (want > 0.01).any()  # something is unkept and it is not negligible
    for slot, name in enumerate(("estimate", "low", "high")):
        assert_close(f"{name} (window={window})", est[..., slot], want, atol=2e-5)


@pytest.mark.parametrize("proposal", ["key", "block"])
def test_estimate_of_the_unkept_to_kept_ratio_is_unbiased(proposal):
    """R^ = U / K per query (M = R / (1 + R), so R = M / (1 - M) from ``per_query``) averaged over 200 seeds
    lands on the float64 truth within 4.5 standard errors for every query: the exact head and the sampled
    tail together are unbiased (M^ itself is biased low a little, Jensen)."""
    g = torch.Generator().manual_seed(2)
    B, Hq, T, S, D, bk = 1, 3, 8, 8 * 40, 8, 8
    q, k = torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hq, S, D, generator=g) * 1.5
    config = MaskConfig(block_q=8, block_k=bk, top_k=3, sink_blocks=1, local_blocks=1)
    indices = sp.stream_mask(q, k, config).indices
    p = torch.softmax((q.double() @ k.double().mT) * D**-0.5 + torch.where(
        torch.arange(S) <= torch.arange(T)[:, None] + S - T, 0.0, -math.inf), -1)  # [B, Hq, T, S]
    kept = torch.zeros(B, Hq, S, dtype=torch.bool)
    for h in range(Hq):
        for j in indices[0, h, 0].tolist():
            kept[0, h, j * bk:(j + 1) * bk] |= j >= 0
    kept_p = (p * kept[:, :, None]).sum(-1)
    want = (1 - kept_p) / kept_p  # [B, Hq, T]
    m = torch.stack([estimate_missed(q, k, indices, config, samples=16, proposal=proposal, seed=seed,
                                     per_query=True)[..., 0] for seed in range(200)]).double()
    r = m / (1 - m)  # [seeds, B, Hq, T]
    zscore = (r.mean(0) - want) / (r.std(0) / math.sqrt(len(r)))
    print(f"{proposal}: truth R {want.mean():.3f}, max |z| {zscore.abs().max():.2f}, "
          f"relative sd of one estimate {(r.std(0) / want).mean():.3f}")
    assert zscore.abs().max() < 4.5 and (r.std(0) > 0).all()
