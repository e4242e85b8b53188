"""Sources of a span (analysis/sources.py) against plain rollout over explicit block matrices.

The references build every layer's dense ``[nQ, nK]`` block matrix with loops (what the library never
builds), multiply them out in float64 and pick paths by brute force. Traces are small and awkward: a ragged
last block, rows of every width (-1 entries at any row end, with junk mass behind them), sliding-window
rows, GQA-like head counts. The missed-mass bars are checked against traces whose dense rows are known."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import random_block_rows

from sparsetrace import Trace
from sparsetrace.analysis.sentences import split_paragraphs
from sparsetrace.analysis.sources import dense_scores, layer_edges, parse_span, rank_of, sources
from sparsetrace.cli import main
from sparsetrace.errors import UsageError
from sparsetrace.viz.synthetic import synthetic_text


def awkward_trace(T=203, L=3, H=4, k=6, b=8, seed=0, window=None, text=True) -> Trace:
    """Random valid rows, then: random widths (trailing -1 with junk mass behind them) and, with
    ``window`` (in blocks), layer 1's rows restricted to the last ``window`` blocks (a sliding layer)."""
    idx, mass = random_block_rows(L, H, T, b, b, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    nQ = idx.shape[2]
    if window is not None:  # layer 1 slides: row i keeps blocks of (i - window, i] only
        for h in range(H):
            for i in range(nQ):
                reach = torch.arange(max(0, i - window + 1), i + 1)
                pick = reach[torch.randperm(len(reach), generator=g)[:k]].sort().values
                idx[1, h, i] = -1
                idx[1, h, i, :len(pick)] = pick.int()
                w = torch.rand(len(pick), generator=g)
                mass[1, h, i] = 0
                mass[1, h, i, :len(pick)] = w / w.sum()
    width = torch.randint(1, k + 1, (L, H, nQ, 1), generator=g)                 # coverage-budget widths
    cut = torch.arange(k).view(1, 1, 1, k) >= width
    idx = torch.where(cut, -1, idx)
    mass = torch.where(cut, 0.5, mass)  # junk behind -1: must be ignored
    txt, tokens, offsets = synthetic_text(T, seed)
    return Trace.from_arrays(idx, mass, block_q=b, block_k=b, tokens=tokens, meta={"model_id": "awkward"},
                             token_offsets=offsets if text else None, text=txt if text else None)


def block_matrices(trace, aggregate: str, sink_blocks: int, keep=None) -> list[torch.Tensor]:
    """``A_l [nQ, nK]`` float64 per layer by loops (module docstring, step 2); ``keep [L, H, nQ]``
    scales each head's row (the kept share under missed mass)."""
    L, H, nQ, nK = trace.num_layers, trace.num_heads, trace.num_query_blocks, trace.num_key_blocks
    out = []
    for layer in range(L):
        idx, mass = trace.layer(layer)
        A = torch.zeros(H, nQ, nK, dtype=torch.float64)
        for h in range(H):
            for i in range(nQ):
                row = [(int(j), float(m)) for j, m in zip(idx[h, i], mass[h, i]) if j >= 0]
                total = sum(m for _, m in row)
                for j, m in row:
                    if total > 0:
                        A[h, i, j] += m / total
        if aggregate == "mean":
            if keep is not None:
                A = A * keep[layer][..., None]
            M = A.mean(0)
        else:
            M = A.max(0).values
            z = M.sum(1, keepdim=True).clamp(min=1e-300)
            if keep is not None:
                M = (A * keep[layer][..., None]).max(0).values
            M = M / z
        for i in range(sink_blocks, nQ):
            M[i, i] += M[i, :sink_blocks].sum()
            M[i, :sink_blocks] = 0
        out.append(M)
    return out


def brute_entry(mats, p, r) -> torch.Tensor:
    """``entry [L, nK]`` by its definition: the flow arriving at j from other blocks at layer l, times
    what stays at j through the layers below."""
    L, n = len(mats), p.shape[0]
    flows = [p.double()]
    for a in reversed(mats):
        flows.append(r * flows[-1] + (1 - r) * a.T @ flows[-1])
    above = flows[::-1][1:]  # above[l] = the flow entering layer l from above
    out = torch.zeros(L, n, dtype=torch.float64)
    for layer, a in enumerate(mats):
        for j in range(n):
            arrive = (1 - r) * sum(float(a[i, j] * above[layer][i]) for i in range(n) if i != j)
            stay = math.prod(r + (1 - r) * float(mats[below][j, j]) for below in range(layer))
            out[layer, j] = arrive * stay
    return out


def span_weights(trace, a: int, b: int) -> torch.Tensor:
    p = torch.zeros(trace.num_query_blocks, dtype=torch.float64)
    for t in range(a, b):
        p[t // trace.block_q] += 1 / (b - a)
    return p


@pytest.mark.parametrize("aggregate", ["mean", "max"])
@pytest.mark.parametrize("sink", ["no-op", "source"])
@pytest.mark.parametrize("residual", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("window", [None, 3])
def test_scores_equal_plain_rollout(aggregate, sink, residual, window):
    trace = awkward_trace(window=window, seed=3 if window else 0)
    for span in [None, (37, 150), (-5, None)]:
        got = sources(trace, span, aggregate=aggregate, sink=sink, residual=residual, top=3)
        a, b = got.span
        mats = block_matrices(trace, aggregate, 1 if sink == "no-op" else 0)
        want = dense_scores(mats, span_weights(trace, a, b), residual)
        err = float((got.score - want).abs().max())
        print(f"{aggregate} sink={sink} r={residual} window={window} span={span}: max |diff| {err:.2e}, "
              f"sum {float(got.score.sum()):.6f}")
        assert err < 1e-6  # float32 weights (the trace's masses are float16 on disk)
        assert abs(float(got.score.sum()) - 1) < 1e-6  # rows sum to 1: the flow is conserved
        # the decomposition by entry layer is exact, and each part is what the matrices say
        assert float((got.origin + got.entry.sum(0) - got.score).abs().max()) < 1e-12
        entry = brute_entry(mats, span_weights(trace, a, b), residual)
        assert float((got.entry - entry).abs().max()) < 1e-6
        assert torch.equal(got.low, got.score) and torch.equal(got.high, got.score)  # no missed mass


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_paths_follow_the_biggest_contributor(aggregate):
    trace = awkward_trace(L=4, seed=5)
    r = 0.5
    got = sources(trace, aggregate=aggregate, residual=r, top=4)
    mats = block_matrices(trace, aggregate, 1)
    p = span_weights(trace, *got.span)
    flows = [p]
    for a in reversed(mats):  # flows[m] = p below layer L - m
        flows.append(r * flows[-1] + (1 - r) * a.T @ flows[-1])
    flow = flows[::-1]  # flow[l] = p below layer l
    assert got.paths
    for block, path in got.paths.items():
        want = [block]
        for layer, a in enumerate(mats):
            b = want[-1]
            contrib = (1 - r) * a[:, b] * flow[layer + 1]
            contrib[b] += r * flow[layer + 1][b]
            want.append(int(torch.argmax(contrib)))
        print(f"path of block {block}: {path}")
        assert path == want
        assert path[-1] in range(got.span[0] // 8, (got.span[1] - 1) // 8 + 1)  # ends in the span


def test_units_sum_their_tokens():
    trace = awkward_trace(T=301, seed=7)
    got = sources(trace, (120, 301), top=2)
    bk = trace.block_k
    per_token = torch.zeros(trace.num_tokens, dtype=torch.float64)
    for t in range(trace.num_tokens):
        j = t // bk
        if not got.excluded[j]:
            per_token[t] = got.score[j] / (min(trace.num_tokens, (j + 1) * bk) - j * bk)
    units = got.units("sentence")
    assert len(units.passages) > 10
    for i, s in enumerate(units.passages):
        assert abs(float(units.score[i]) - float(per_token[s.token_start:s.token_end].sum())) < 1e-12
    rows = got.top(5)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))
    assert all(r["text"] and r["text"] in trace.text for r in rows)
    shares = [share for r in rows for _, share in r["layers"]]
    assert shares and all(0 < s <= 1 + 1e-9 for s in shares)
    # the span's and the sink's blocks never rank
    ranked = got.units("block").order()
    assert not set(ranked) & set(torch.nonzero(got.excluded).flatten().tolist())
    assert got.excluded[0] and got.excluded[120 // bk] and got.excluded[-1]


def test_paragraphs():
    text = "First para.\nstill first.\n\n  Second one.\n \n\nThird\n"
    paras = split_paragraphs(text)
    assert [p.text for p in paras] == ["First para.\nstill first.", "Second one.", "Third"]
    assert all(text[p.char_start:p.char_end] == p.text for p in paras)


def pruned(dense_idx, dense_mass, keep_k: int, seed: int):
    """Keep the sink, the diagonal and ``keep_k - 2`` random other causal blocks of each dense row;
    renormalise. Returns the sparse rows and the dropped (missed) mass per row ``[L, H, nQ]``."""
    L, H, nQ, nK = dense_idx.shape
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(L, H, nQ, nK, generator=g)
    i = torch.arange(nQ).view(1, 1, nQ, 1)
    j = torch.arange(nK).view(1, 1, 1, nK)
    score = torch.where(j > i, -1.0, score)                      # never a non-causal block
    score = torch.where((j == 0) | (j == i), 2.0, score)         # forced: sink and diagonal
    top = torch.topk(score, keep_k, -1)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top.indices, top.values >= 0)
    missed = (dense_mass * ~keep).sum(-1)
    kept_idx = torch.where(keep, j.expand_as(score), 10**6).sort(-1).values[..., :keep_k]
    kept_mass = torch.gather(dense_mass, -1, kept_idx.clamp(max=nK - 1)).masked_fill(kept_idx >= nK, 0)
    kept_idx = kept_idx.masked_fill(kept_idx >= nK, -1)
    kept_mass = kept_mass / kept_mass.sum(-1, keepdim=True)
    return kept_idx.int(), kept_mass.float(), missed.double()


def dense_rows(T, L, H, b, seed):
    nQ = math.ceil(T / b)
    g = torch.Generator().manual_seed(seed)
    mass = torch.rand(L, H, nQ, nQ, generator=g) ** 4
    i = torch.arange(nQ).view(1, 1, nQ, 1)
    j = torch.arange(nQ).view(1, 1, 1, nQ)
    mass = torch.where(j <= i, mass, 0.0)
    mass[..., 0] += 0.5  # a sink
    mass = mass / mass.sum(-1, keepdim=True)
    idx = torch.where(j <= i, j, -1).expand(L, H, nQ, nQ).int()
    return idx, mass.double()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_missed_mass_bars_hold_the_dense_flow(seed):
    """A dense trace, pruned to k blocks per row: the sparse trace plus each row's missed mass gives bars
    that hold the dense trace's flow, block by block and sentence by sentence."""
    T, L, H, b = 157, 4, 3, 8
    idx, mass = dense_rows(T, L, H, b, seed)
    txt, tokens, offsets = synthetic_text(T, seed)
    dense = Trace.from_arrays(idx, mass.float(), block_q=b, block_k=b, tokens=tokens, token_offsets=offsets,
                              text=txt)
    s_idx, s_mass, mu = pruned(idx, mass, 6, seed)
    sparse = Trace.from_arrays(s_idx, s_mass, block_q=b, block_k=b, tokens=tokens, token_offsets=offsets,
                               text=txt)
    truth = sources(dense, (100, T), top=0)  # its rows hold every causal block: nothing missed
    print(f"missed mass per row: mean {float(mu.mean()):.3f}, max {float(mu.max()):.3f}")
    for width in (0.0, 0.05, 0.2):
        interval = torch.stack([mu, (mu - width).clamp(min=0), (mu + width).clamp(max=1)], -1)
        got = sources(sparse, (100, T), missed=interval, top=0)
        assert got.has_missed
        assert bool((got.low <= got.score + 1e-12).all() and (got.score <= got.high + 1e-12).all())
        inside = (truth.score >= got.low - 1e-6) & (truth.score <= got.high + 1e-6)
        print(f"width {width}: dense flow inside the bars for {int(inside.sum())}/{inside.numel()} blocks; "
              f"mean bar {float((got.high - got.low).mean()):.4f}, unattributed {got.unattributed:.3f}")
        assert bool(inside.all())
        sd, ss = truth.units("sentence"), got.units("sentence")
        assert bool(((sd.score >= ss.low - 1e-6) & (sd.score <= ss.high + 1e-6)).all())
        if width == 0.0:
            # the estimate with the exact missed mass is the dense flow along kept edges: at most the
            # dense flow, and the sum of both sides' differences is the unattributed flow
            assert bool((got.score <= truth.score + 1e-6).all())
            narrow = got
    assert bool((got.low <= narrow.low + 1e-12).all() and (got.high >= narrow.high - 1e-12).all())
    # no estimates: zero bars and the sparse model's own flow
    plain = sources(sparse, (100, T), missed=False, top=0)
    assert not plain.has_missed and torch.equal(plain.low, plain.high) and abs(plain.unattributed) < 1e-6


def test_missed_mass_is_read_from_the_trace_when_it_has_it(tmp_path):
    """The store's own estimates (``Trace.missed(layer, head)`` -> float32 ``[nQ, 3]``), in memory and
    read back from disk, give the same scores as passing them; traces without them give zero bars."""
    T, L, H, b = 120, 2, 2, 8
    idx, mass = dense_rows(T, L, H, b, 4)
    s_idx, s_mass, mu = pruned(idx, mass, 4, 4)
    estimates = torch.stack([mu, mu * 0.5, (mu * 1.5).clamp(max=1)], -1).float()   # [L, H, nQ, 3]
    in_memory = Trace.from_arrays(s_idx, s_mass, block_q=b, block_k=b, tokens=torch.arange(T), missed=estimates)
    in_memory.save(tmp_path / "t")
    on_disk = Trace.load(tmp_path / "t")
    assert on_disk.has_missed and on_disk.missed(1, 0).shape == (math.ceil(T / b), 3)
    for trace, kept in ((in_memory, estimates), (on_disk, estimates.half().float())):  # stored float16
        given = sources(trace, missed=lambda layer, head, kept=kept: kept[layer, head], top=0)
        auto = sources(trace, top=0)
        assert auto.has_missed and auto.unattributed > 0.01
        assert torch.allclose(auto.score, given.score, atol=1e-12) and torch.allclose(auto.high, given.high)
        assert not sources(trace, missed=False, top=0).has_missed
    plain = Trace.from_arrays(s_idx, s_mass, block_q=b, block_k=b, tokens=torch.arange(T))
    assert plain.missed(0, 0) is None  # recorded without estimates (as every trace before the audit)
    found = sources(plain, top=0)
    assert not found.has_missed and torch.equal(found.low, found.high)
    assert not sources(plain, missed=lambda layer, head: None, top=0).has_missed
    with pytest.raises(UsageError, match="missed mass of shape"):
        sources(plain, missed=torch.zeros(1, 2, 3), top=0)


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_heads_a_few_at_a_time_give_the_same_floats(aggregate, tmp_path, monkeypatch):
    """On the CPU a layer is read and propagated a few heads at a time (``HEAD_GROUP`` entries): the same
    float32 sums in the same order as all heads at once, so every score, entry and path is equal, not just
    close; from disk (shards, the parallel first hash) as in memory."""
    import sparsetrace.analysis.sources as src

    T, L, H, b = 150, 3, 4, 8
    idx, mass = dense_rows(T, L, H, b, 5)
    s_idx, s_mass, mu = pruned(idx, mass, 5, 5)
    bars = torch.stack([mu, mu * 0.5, (mu * 1.5).clamp(max=1)], -1).float()   # [L, H, nQ, 3]
    memory = Trace.from_arrays(s_idx, s_mass, block_q=b, block_k=b, tokens=torch.arange(T), missed=bars)
    memory.save(tmp_path / "t", chunk_query_blocks=7)
    for trace in (memory, Trace.load(tmp_path / "t", verify=False)):
        for missed in (None, False):
            whole = sources(trace, (90, T), aggregate=aggregate, missed=missed, top=5)
            monkeypatch.setattr(src, "HEAD_GROUP", 1)                  # one head at a time
            parts = sources(trace, (90, T), aggregate=aggregate, missed=missed, top=5)
            monkeypatch.undo()
            for name in ("score", "low", "high", "entry", "origin"):
                assert torch.equal(getattr(whole, name), getattr(parts, name)), name
            assert whole.paths == parts.paths and whole.path_shares == parts.path_shares and whole.paths


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_layers_kept_for_the_path_pass_are_read_once(aggregate, monkeypatch):
    """Where the layers fit on the GPU they are read once and kept for the path pass: the same result
    (checked here on the CPU, by keeping them there), and one read per layer instead of two."""
    import sparsetrace.analysis.sources as src

    trace = awkward_trace(T=203, seed=4)
    plain = sources(trace, (150, 203), aggregate=aggregate, top=4)
    reads = []
    read = trace.layer
    monkeypatch.setattr(trace, "layer", lambda layer, **kw: reads.append(layer) or read(layer, **kw))
    monkeypatch.setattr(src, "_keeps_layers", lambda trace, device: True)
    kept = sources(trace, (150, 203), aggregate=aggregate, top=4)
    assert sorted(reads) == list(range(trace.num_layers))
    for name in ("score", "high", "entry", "origin"):
        assert torch.equal(getattr(plain, name), getattr(kept, name)), name
    assert plain.paths == kept.paths and plain.paths


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_on_the_gpu_equal_the_cpu(aggregate, tmp_path):
    s_idx, s_mass, mu = pruned(*dense_rows(160, 3, 4, 8, 6), 5, 6)
    bars = torch.stack([mu, mu * 0.5, (mu * 1.5).clamp(max=1)], -1).float()
    Trace.from_arrays(s_idx, s_mass, block_q=8, block_k=8, tokens=torch.arange(160), missed=bars).save(tmp_path / "t")
    trace = Trace.load(tmp_path / "t")
    cpu, gpu = (sources(trace, (100, 160), aggregate=aggregate, top=4, device=d) for d in ("cpu", "cuda"))
    for name in ("score", "low", "high", "entry"):
        assert torch.allclose(getattr(cpu, name), getattr(gpu, name), atol=1e-6), name
    assert cpu.paths.keys() == gpu.paths.keys()


def test_layers_read_some_heads_and_on_a_device(tmp_path):
    s_idx, s_mass, _ = pruned(*dense_rows(150, 2, 4, 8, 3), 4, 3)
    trace = Trace.from_arrays(s_idx, s_mass, block_q=8, block_k=8, tokens=torch.arange(150))
    trace.save(tmp_path / "t", chunk_query_blocks=5)
    for t in (trace, Trace.load(tmp_path / "t")):
        idx, mass = t.layer(1)
        some = t.layer(1, heads=slice(1, 3), device="cpu")
        assert torch.equal(some[0], idx[1:3]) and torch.equal(some[1], mass[1:3])
        assert some[0].dtype == torch.int32 and some[1].dtype == torch.float32
        some[0][:] = 7  # a copy: the trace's own rows are untouched
        assert torch.equal(t.layer(1)[0], idx)


def test_the_command_imports_only_what_it_reads_with(trace_dir):
    """``sparsetrace sources`` loads the store and the analysis, not the estimators, the attention, the
    model code or transformers; ``import sparsetrace`` still resolves every public name (lazily)."""
    import subprocess
    import sys

    code = ("import sys\nfrom sparsetrace.cli import main\n"
            f"assert main(['sources', {str(trace_dir)!r}, '--top', '3']) == 0\n"
            "loaded = [m for m in ('sparsetrace.ops', 'sparsetrace.selection', 'sparsetrace.attention',\n"
            "          'sparsetrace.tracing', 'sparsetrace.viz', 'transformers') if m in sys.modules]\n"
            "assert not loaded, loaded\n"
            "import sparsetrace as st\n"
            "assert all(getattr(st, name) is not None for name in st.__all__ if name != 'load_model')\n"
            "assert st.stream_mask.__module__ == 'sparsetrace.ops' and 'stream_mask' in dir(st)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank" in done.stdout


def test_missed_mass_scales_each_head_row():
    """One edge list per layer: the three columns are the rows scaled by 1 - estimate, 1 - high, 1 - low."""
    idx = torch.tensor([[[0, -1], [0, 1]]], dtype=torch.int32)          # [H=1, nQ=2, k=2]
    mass = torch.tensor([[[1.0, 0.7], [0.25, 0.75]]])                    # junk behind the -1
    mu = torch.tensor([[[0.0, 0.0, 0.0], [0.2, 0.1, 0.4]]], dtype=torch.float64)
    e = layer_edges(idx, mass, "mean", mu, 2)
    qi, kj, w = e.flat()
    assert qi.tolist() == [0, 0, 1, 1] and kj.tolist() == [0, -1, 0, 1]  # -1 stays -1, with weight 0
    want = torch.tensor([[1.0, 1.0, 1.0], [0, 0, 0], [0.2, 0.15, 0.225], [0.6, 0.45, 0.675]])
    assert torch.allclose(w, want)
    assert torch.allclose(e.lost, torch.tensor([0.0, 0.4], dtype=torch.float64))


def test_bad_input_is_one_sentence():
    trace = awkward_trace()
    for kwargs, match in [({"aggregate": "sum"}, "aggregate"), ({"residual": 1.0}, "residual"),
                          ({"sink": "drop"}, "sink"), ({"span": (500, 600)}, "holds no token"),
                          ({"span": (10, 10)}, "holds no token")]:
        with pytest.raises(UsageError, match=match):
            sources(trace, **kwargs)
    with pytest.raises(UsageError, match="START:END"):
        parse_span("12-40")
    assert parse_span("-32:") == (-32, None) and parse_span("3:9") == (3, 9)
    no_text = awkward_trace(text=False)
    with pytest.raises(UsageError, match="no text"):
        sources(no_text, top=0).units("sentence")
    assert sources(no_text, top=2).top(2, "block")  # blocks work without text
    odd = Trace.from_arrays(*random_block_rows(1, 1, 40, 8, 4, 3), block_q=8, block_k=4, tokens=torch.arange(40))
    with pytest.raises(UsageError, match="one block size"):
        sources(odd)


def test_rank_of():
    trace = awkward_trace(seed=2)
    got = sources(trace, top=0)
    order = got.units("block").order()
    assert rank_of(got, [order[2], order[5]]) == 3
    assert math.isinf(rank_of(got, [0]))  # the sink never ranks


# --------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    from sparsetrace.viz.synthetic import write_synthetic_trace

    path = tmp_path_factory.mktemp("sources") / "syn"
    write_synthetic_trace(path, num_tokens=3000, num_layers=5, num_heads=3, top_k=8, block_size=16)
    return path


def test_cli_prints_passages_and_writes_tables(trace_dir, tmp_path, capsys):
    out_json, out_csv = tmp_path / "s.json", tmp_path / "s.csv"
    assert main(["sources", str(trace_dir), "--span", "2900:3000", "--top", "4", "--json", str(out_json),
                 "--csv", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "sources of tokens 2,900–3,000" in printed
    lines = [line for line in printed.splitlines() if line.lstrip()[:2] in {f"{i} " for i in range(1, 5)}]
    assert len(lines) == 4 and all("L" in line for line in lines)
    data = json.loads(out_json.read_text())
    assert data["span"] == [2900, 3000] and len(data["top"]) == 4 and data["rows"][0]["rank"] == 1
    trace = Trace.load(trace_dir)
    want = sources(trace, (2900, 3000), top=4)
    assert [r["text"] for r in data["top"]] == [r["text"] for r in want.top(4)]
    assert abs(data["top"][0]["score"] - want.top(1)[0]["score"]) < 1e-12
    header = out_csv.read_text().splitlines()[0]
    assert header.startswith("rank,kind,index,token_start,token_end,score,low,high")
    assert len(out_csv.read_text().splitlines()) == 1 + len(want.units("sentence").passages)
    assert main(["sources", str(trace_dir), "--unit", "block", "--top", "3", "--aggregate", "max"]) == 0
    assert "block" in capsys.readouterr().out


def test_cli_bad_input(trace_dir, tmp_path, capsys):
    assert main(["sources", str(trace_dir), "--span", "5000:6000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no token" in err
    assert main(["sources", str(tmp_path / "nothing")]) == 2
    assert "not a trace directory" in capsys.readouterr().err
    assert main(["sources", str(trace_dir), "--json", str(tmp_path)]) == 2
    assert "directory" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("model,tokens", [("smollm2-135m", 300), ("gemma-3-270m", 700)])
def test_real_traces_equal_plain_rollout(model, tokens):
    """Real traces of both models (Gemma's sliding-window layers past its 512-token window; the traces the
    browser tests build, cached): the scores equal plain rollout over the rows' matrices, and the chain of
    every top source ends in the span. With the trace's own missed-mass estimates (the tracer records them),
    the scores equal rollout over rows scaled by 1 - estimate, inside their bars."""
    from test_browser import real_trace

    trace = real_trace(model, tokens)
    assert trace.has_missed
    estimate = torch.stack([torch.stack([trace.missed(layer, h)[:, 0] for h in range(trace.num_heads)])
                            for layer in range(trace.num_layers)]).double()           # [L, H, nQ]
    print(f"{model}: estimated missed mass per row: mean {float(estimate.mean()):.4f}, "
          f"max {float(estimate.max()):.4f}")
    for aggregate in ("mean", "max"):
        plain = sources(trace, aggregate=aggregate, missed=False, top=0)
        want = dense_scores(block_matrices(trace, aggregate, plain.sink_blocks), span_weights(trace, *plain.span))
        assert float((plain.score - want).abs().max()) < 1e-6
        got = sources(trace, aggregate=aggregate, top=5)                              # the trace's estimates
        assert got.has_missed and bool((got.low <= got.score + 1e-12).all() & (got.score <= got.high + 1e-12).all())
        want = dense_scores(block_matrices(trace, aggregate, got.sink_blocks, keep=1 - estimate),
                            span_weights(trace, *got.span))
        err = float((got.score - want).abs().max())
        top = got.top(3)
        print(f"{model} {aggregate}: max |diff| {err:.2e}; top: " + " | ".join(
            f"{r['score']:.3f} L{r['layers'][0][0] if r['layers'] else '-'} {' '.join(r['text'].split())[:40]}"
            for r in top))
        assert err < 1e-6 and len(top) == 3 and all(r["text"] in trace.text for r in top)
        assert all(path[-1] == trace.num_query_blocks - 1 for path in got.paths.values())


def test_printed_table_shows_error_bars_with_missed_mass():
    from sparsetrace.commands.sources import format_report

    T, L, H, b = 157, 4, 3, 8
    idx, mass = dense_rows(T, L, H, b, 1)
    txt, tokens, offsets = synthetic_text(T, 1)
    s_idx, s_mass, mu = pruned(idx, mass, 6, 1)
    sparse = Trace.from_arrays(s_idx, s_mass, block_q=b, block_k=b, tokens=tokens, token_offsets=offsets, text=txt)
    found = sources(sparse, missed=torch.stack([mu, mu * 0.5, (mu * 1.5).clamp(max=1)], -1), top=3)
    text = format_report(found, found.top(3), "sentence", L)
    print(text)
    assert "missed mass: error bars" in text and "unattributed flow" in text
    rows = found.top(3)
    assert f"[{rows[0]['low']:.4f}, {rows[0]['high']:.4f}]" in text
    plain = format_report(sources(sparse, top=3), sources(sparse, top=3).top(3), "sentence", L)
    assert "[" not in plain.split("\n", 3)[-1]  # no bars without estimates
