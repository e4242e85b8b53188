"""NIAH: RULER-style case generation, string_match_all, needle mass and routes on synthetic traces
(against brute force), the CLI end to end on SmolLM2 (slow), and bad inputs."""

from __future__ import annotations

import csv
import itertools
import json
import math

import pytest
import torch
from helpers import child_env, random_block_rows

from sparsetrace.analysis import routes
from sparsetrace.commands.options import read_text
from sparsetrace.datasets import ruler as niah
from sparsetrace.errors import UsageError
from sparsetrace.runs import niah as niah_runs
from sparsetrace.store import Trace


@pytest.fixture(scope="module")
def tokenizer(smollm):
    return smollm[1]


HAYSTACK = " ".join(
    f"Sentence number {i} talks about topic {i % 7} at some length, with a few more words." for i in range(400)
)


# --------------------------------------------------------------------------- generator

@pytest.mark.parametrize("variant", list(niah.VARIANTS))
def test_every_variant(tokenizer, variant):
    length, v = 700, niah.VARIANTS[variant]
    for depth in (0, 50, 100):
        case = niah.make_case(variant, tokenizer, length, depth, seed=3, haystack=HAYSTACK)
        ids = niah.encode(tokenizer, case)
        assert len(ids) == case.num_tokens <= length
        unit = 80 if v.haystack == "needle" else 6  # one needle line, or a word / short sentence
        assert length - case.num_tokens <= unit, (variant, case.num_tokens)
        assert len(case.answers) == v.num_needle_v * v.num_needle_q
        assert len(case.needles) == v.num_needle_k * v.num_needle_v
        relevant = [n for n in case.needles if n.relevant]
        assert [n.token_span for n in relevant] == case.needle_token_spans
        for n in case.needles:
            assert case.input[n.char_span[0]:n.char_span[1]] == n.text
            decoded = tokenizer.decode(ids[n.token_span[0]:n.token_span[1]])
            assert n.text in decoded and len(decoded) <= len(n.text) + 2, (decoded, n.text)
            assert n.value in n.text and n.key in n.text
        assert all(any(a in n.text for n in relevant) for a in case.answers)
        assert all(q in case.input[-300:] for q in case.queries)  # asked in the question
        first = relevant[0]  # the needle placed at the requested depth
        assert abs(first.depth - depth) < 10, (first.depth, depth)
        token_depth = niah.needle_depth_tokens(case)
        if depth == 0:  # right after the instruction
            assert case.input[: first.char_span[0]].rstrip().endswith("afterwards.") and token_depth < 10
        elif depth == 100:  # right before the question
            assert case.input[first.char_span[1]:].lstrip().startswith("What")
        else:
            assert 25 < token_depth < 75
        if v.type_needle_v == "uuids":
            assert all(len(a) == 36 and a.count("-") == 4 for a in case.answers)
        else:
            assert all(len(a) == 7 and a.isdigit() for a in case.answers)


def test_templates_follow_ruler(tokenizer):
    single = niah.make_case("niah_single_2", tokenizer, 500, 50, haystack=HAYSTACK)
    assert single.input.startswith("A special magic number is hidden within the following text.")
    assert single.input.endswith(
        f"What is the special magic number for {single.queries[0]} mentioned in the provided text? "
        f"The special magic number for {single.queries[0]} mentioned in the provided text is")
    assert "One of the special magic numbers for " in single.input  # needles keep the plural
    multi = niah.make_case("niah_multiquery", tokenizer, 500, 50, haystack=HAYSTACK)
    q = multi.queries
    assert multi.input.endswith(f"{q[0]}, {q[1]}, {q[2]}, and {q[3]} mentioned in the provided text are")
    noise = niah.make_case("niah_single_1", tokenizer, 300, 50)
    assert niah.NOISE in noise.input and "\n" + noise.needles[0].text + "\n" in noise.input


def test_reproducible_and_seeded(tokenizer):
    args = (["niah_single_2", "niah_multikey_2"], tokenizer, [400], [0, 100])
    a = niah.make_cases(*args, samples=2, seed=7, haystack=HAYSTACK)
    b = niah.make_cases(*args, samples=2, seed=7, haystack=HAYSTACK)
    c = niah.make_cases(*args, samples=2, seed=8, haystack=HAYSTACK)
    def dump(cases):
        return [json.dumps(x.to_json()) for x in cases]

    assert dump(a) == dump(b)
    assert all(x.answers != y.answers for x, y in zip(a, c))
    assert len({tuple(x.answers) for x in a}) == len(a)  # samples differ too
    assert niah.NiahCase.from_json(json.loads(dump(a)[0])) == a[0]


def test_real_essays_haystack(tokenizer):
    case = niah.make_case("niah_single_3", tokenizer, 1024, 25, seed=0)
    assert 1024 - 6 <= case.num_tokens <= 1024 and "magic uuids for" in case.input


def test_parse_length():
    assert [niah.parse_length(x) for x in ("600", "1k", "4K", "0.5k")] == [600, 1024, 4096, 512]
    for bad in ("abc", "0", "-3"):
        with pytest.raises(ValueError, match="length"):
            niah.parse_length(bad)


def test_bad_generator_inputs(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown NIAH variant 'niah_single_9'.*niah_single_1"):
        niah.make_case("niah_single_9", tokenizer, 500, 50)
    with pytest.raises(ValueError, match="shorter than the needles and question.*minimum is \\d+"):
        niah.make_case("niah_single_2", tokenizer, 40, 50, haystack=HAYSTACK)
    with pytest.raises(ValueError, match="depth"):
        niah.make_case("niah_single_2", tokenizer, 500, 120, haystack=HAYSTACK)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_text(empty, "--haystack-file")
    with pytest.raises(UsageError):
        read_text(tmp_path / "missing.txt", "--haystack-file")


# --------------------------------------------------------------------------- scoring

def test_string_match_all():
    assert niah.string_match_all(": 1234567.", ["1234567"]) == 1.0
    assert niah.string_match_all("nothing here", ["1234567"]) == 0.0
    assert niah.string_match_all("1, 2 and ABC-def", ["1", "abc-DEF", "9", "x"]) == 0.5
    assert niah.string_match_all("  12\x0034 ", ["12\n34"]) == 1.0  # RULER's postprocess
    with pytest.raises(ValueError):
        niah.string_match_all("x", [])
    assert niah_runs.two_token_criterion([1, 2, 3], [1, 2, 9])
    assert not niah_runs.two_token_criterion([1, 2], [1, 3])


# --------------------------------------------------------------------------- routes

def random_trace(L=3, H=2, nQ=6, k=3, block=4, seed=0) -> Trace:
    """Causal rows of k unique kept blocks (-1 padded where fewer are causal), masses summing to 1."""
    idx, mass = random_block_rows(L, H, nQ * block - 1, block, block, k, seed)
    return Trace.from_arrays(idx, mass, block_q=block, block_k=block,
                             tokens=torch.zeros(nQ * block - 1))


def brute_force_route(trace, spans, aggregate):
    """Enumerate every chain b_0 .. b_L and return the best (score, blocks)."""
    L, H, nQ = trace.num_layers, trace.num_heads, trace.num_query_blocks
    w = torch.zeros(L, nQ, nQ, dtype=torch.float64)  # [layer, query block, key block]
    for l in range(L):
        for h in range(H):
            idx, mass = trace[l, h]
            for i in range(nQ):
                for j, m in zip(idx[i].tolist(), mass[i].tolist()):
                    if j >= 0 and m > 0:
                        w[l, i, j] = max(w[l, i, j], m) if aggregate == "max" else w[l, i, j] + m / H
    best = (-math.inf, None)
    starts = routes.needle_blocks(spans, trace.block_k)
    for b0 in starts:
        for middle in itertools.product(range(nQ), repeat=L - 1):
            chain = [b0, *middle, nQ - 1]
            score = sum(math.log(w[l, chain[l + 1], chain[l]]) if w[l, chain[l + 1], chain[l]] > 0
                        else -math.inf for l in range(L))
            if score > best[0] + 1e-12:
                best = (score, chain)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_route_matches_brute_force(seed, aggregate):
    trace = random_trace(L=3 + seed % 2, H=2, nQ=5 + seed % 3, k=2 + seed % 2, seed=seed)
    spans = [(5, 9)]  # blocks 1 and 2
    route = routes.needle_route(trace, spans, aggregate=aggregate)
    score, chain = brute_force_route(trace, spans, aggregate)
    print(f"seed {seed} {aggregate}: dp {route.score:.6f} {route.blocks}, brute {score:.6f} {chain}")
    if chain is None:
        assert not route.found and route.blocks == []
        return
    assert math.isclose(route.score, score, rel_tol=1e-9, abs_tol=1e-9)
    assert route.blocks[0] in (1, 2) and route.blocks[-1] == trace.num_query_blocks - 1
    assert math.isclose(sum(math.log(m) for m in route.masses), score, rel_tol=1e-6, abs_tol=1e-9)
    assert all(a <= b for a, b in zip(route.blocks, route.blocks[1:]))  # causal
    for l, (j, i) in enumerate(zip(route.blocks, route.blocks[1:])):  # every edge was kept
        if aggregate == "max":
            idx, mass = trace[l, route.heads[l]]
            r = idx[i].tolist().index(j)
            assert math.isclose(float(mass[i, r]), route.masses[l], rel_tol=1e-6)
    json.dumps(route.to_json())


def test_route_none_when_needle_unreachable():
    trace = random_trace(L=2, H=1, nQ=4, k=1, seed=1)  # k=1: every row keeps one block
    idx = torch.arange(4, dtype=torch.int32).view(1, 1, 4, 1).expand(2, 1, 4, 1).clone()
    trace = Trace.from_arrays(idx, torch.ones(2, 1, 4, 1), block_q=4, block_k=4,
                              tokens=torch.zeros(16))
    route = routes.needle_route(trace, [(0, 2)])  # only the diagonal: block 0 never reaches 3
    assert not route.found and route.to_json()["score"] is None


def test_needle_mass_per_head():
    L, H, nQ, k = 2, 3, 4, 2
    idx = torch.tensor([[0, -1], [0, 1], [1, 2], [0, 3]], dtype=torch.int32).expand(L, H, nQ, k).clone()
    mass = torch.tensor([[1.0, 0], [0.5, 0.5], [0.3, 0.7], [0.2, 0.8]]).expand(L, H, nQ, k).clone()
    mass[1, 2, 3] = torch.tensor([0.9, 0.1])  # a "retrieval head" at layer 1, head 2
    trace = Trace.from_arrays(idx, mass, block_q=8, block_k=8, tokens=torch.zeros(30))
    got = routes.needle_mass(trace, [(2, 6)])  # block 0
    want = torch.tensor([[0.2, 0.2, 0.2], [0.2, 0.2, 0.9]])
    assert torch.allclose(got, want), got
    assert torch.allclose(routes.needle_mass(trace, [(9, 12)]), torch.zeros(L, H))  # block 1 dropped
    assert torch.allclose(routes.needle_mass(trace, [(9, 12)], query_block=2), torch.full((L, H), 0.3))
    assert routes.needle_blocks([(7, 9), (30, 31)], 8) == [0, 1, 3]
    forced = Trace.from_arrays(idx, mass, block_q=8, block_k=8, tokens=torch.zeros(30),
                               meta={"trace_config": {"mask": {"sink_blocks": 1, "local_blocks": 1}}})
    assert [routes.needle_in_forced_blocks(forced, [s]) for s in ((2, 6), (9, 12), (25, 28))] == [
        True, False, True]  # the sink, a middle block, the answer block itself
    with pytest.raises(ValueError, match="one block size"):
        routes.needle_mass(Trace.from_arrays(idx, mass, block_q=8, block_k=4,
                                             tokens=torch.zeros(30)), [(0, 1)])


def test_compare_heads():
    success = [True, True, True, False, False]
    masses = [torch.zeros(2, 2) for _ in success]
    for m, s in zip(masses, success):
        m[1, 0] = 0.8 if s else 0.1  # separates perfectly
        m[0, 1] = 0.5  # does not separate
    sep = routes.compare_heads(masses, success)
    assert sep.top[0]["layer"] == 1 and sep.top[0]["head"] == 0 and sep.top[0]["auc"] == 1.0
    assert sep.auc[0][1] == 0.5 and math.isclose(sep.difference[1][0], 0.7, rel_tol=1e-6)
    assert routes.compare_heads(masses[:2], success[:2]).auc is None  # no failures
    json.dumps(sep.to_json())


# --------------------------------------------------------------------------- CLI

def test_cli_bad_inputs(tmp_path, capsys):
    from sparsetrace.cli import main

    empty = tmp_path / "e.txt"
    empty.write_text("")
    cases = [
        (["--variant", "niah_single_9"], "unknown NIAH variant"),
        (["--haystack-file", str(empty)], "is empty"),
        (["--lengths", "50"], "minimum is"),
        (["--lengths", "20k"], "context window"),
        (["--top-k", "2"], "top_k"),
        (["--depths", "150"], "depth"),
    ]
    for extra, message in cases:
        code = main(["niah", "--lengths", "600", "--depths", "50", "--top-k", "8",
                     "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)


def test_niah_study_bad_inputs_end_in_one_line_and_keep_the_results(tmp_path):
    """bench/niah_study.py: a wrong option stops before any model loads, with argparse's one error line (no
    traceback), and the results JSON it would add to is left as it was."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "bench" / "niah_study.py"
    out = tmp_path / "niah.json"
    out.write_text('{"rows": [], "reports": []}\n')
    cases = [(["--top-k", ""], "no --top-k values"), (["--coverage", "0.9,x"], "--coverage value 'x'"),
             (["--coverage", "1.5"], "strictly between 0 and 1"), (["--depths", "120"], "outside 0..100"),
             (["--lengths", "4q"], "not a token count")]
    for extra, message in cases:
        run = subprocess.run([sys.executable, str(script), "--out", str(out), *extra], capture_output=True,
                             text=True, timeout=120, env=child_env())
        last = run.stderr.strip().splitlines()[-1]
        assert run.returncode == 2 and message in last and "Traceback" not in run.stderr, (extra, run.stderr)
        assert out.read_text() == '{"rows": [], "reports": []}\n'


def _bench_module(name: str):
    """A bench script imported as a module (bench/ is not a package)."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    return importlib.import_module(name)


def test_noise_floor_oracle_slips_to_its_runner_up_outside_the_tail():
    """bench/niah_noise_floor.py: with share 0 its selection is the oracle's; with share 1 every searched row
    outside the input's tail keeps the oracle's m - 1 best middle blocks and the (m+1)-th instead of the m-th
    (brute force over the exact block scores), and the tail's rows stay the oracle's."""
    runner_up_oracle = _bench_module("niah_noise_floor").runner_up_oracle

    from sparsetrace.config import MaskConfig
    from sparsetrace.ops import select_blocks
    from sparsetrace.selection.oracle import block_scores
    from sparsetrace.selection.shortlist import exact_tail_blocks

    torch.manual_seed(11)
    q, k = torch.randn(1, 4, 700, 16), torch.randn(1, 2, 700, 16)
    for top_k in (3, 4, 6):
        config = MaskConfig(block_q=32, block_k=32, top_k=top_k, estimator="oracle")
        oracle = select_blocks(q, k, config).indices
        same = runner_up_oracle(0.0, torch.Generator().manual_seed(0))(q, k, config).indices
        assert torch.equal(same, oracle)
        slipped = runner_up_oracle(1.0, torch.Generator().manual_seed(0))(q, k, config).indices
        scores = block_scores(q, k, config)
        m, n_q = top_k - 2, oracle.shape[2]
        tail = exact_tail_blocks(700, 700, 32)
        assert torch.equal(slipped[:, :, n_q - tail:], oracle[:, :, n_q - tail:])
        for h, i in itertools.product(range(4), range(n_q - tail)):
            middle = list(range(1, i))  # sink 0 and local block i are forced
            if len(middle) <= m:
                assert torch.equal(slipped[0, h, i], oracle[0, h, i])
                continue
            ranked = sorted(middle, key=lambda j: (-float(scores[0, h, i, j]), j))
            expected = sorted([0, *ranked[:m - 1], ranked[m], i])
            assert slipped[0, h, i].tolist() == expected, (top_k, h, i)


@pytest.mark.parametrize("S", [96, 101])
def test_prescore_bound_is_above_every_keys_dot(S):
    """bench/niah_prescore.py: Quest's bound is at least ``qsum . k`` for every real key of a block (float64
    brute force, a ragged last block of 101 keys included) and equals ``sum_d qsum_d`` times the dimension's
    largest key value where ``qsum_d >= 0``, its smallest otherwise."""
    prescore = _bench_module("niah_prescore")
    torch.manual_seed(S)
    Hkv, group, D, bk = 2, 3, 8, 16
    k = torch.randn(1, Hkv, S, D)
    q_sum = torch.randn(1, Hkv * group, 5, D)
    bound = prescore.bound_scores(q_sum, *prescore.pool_key_bounds(k, bk))  # [1, Hq, 5, nKB]
    for j in range(math.ceil(S / bk)):
        keys = k[0, :, j * bk:(j + 1) * bk].double().repeat_interleave(group, 0)  # [Hq, w, D], real keys only
        dots = torch.einsum("hcd,hwd->hcw", q_sum[0].double(), keys)
        assert (bound[0, :, :, j].double() >= dots.max(-1).values - 1e-4).all(), j
        k_max, k_min = keys.max(1).values[:, None], keys.min(1).values[:, None]  # [Hq, 1, D]
        want = torch.where(q_sum[0] >= 0, q_sum[0] * k_max, q_sum[0] * k_min).sum(-1)
        torch.testing.assert_close(bound[0, :, :, j].double(), want, rtol=1e-5, atol=1e-4)


def test_prescore_harness_ranks_shortlist_rows_by_the_bound(monkeypatch):
    """Under ``bound_prescore()`` SHORTLIST's rows equal the plain-loop reference ranked by the same bound in
    float64 (600 tokens, block 8: most rows shortlist a few of their candidates), differ from the library's,
    and the library's step 2 is restored after it; ``min_width=4`` gives k 4 rows (m = 2) the one-block
    rule's 4 candidates a level and leaves other m alone."""
    from sparsetrace.config import MaskConfig
    from sparsetrace.selection import reference, shortlist

    prescore = _bench_module("niah_prescore")

    def loop_bound(q, k, b, h, group, i, j, T, S, block_q, block_k, query_stride, z):
        q_sum = q[b, h, reference._used_rows(i, T, block_q, query_stride)].double().sum(0)
        keys = k[b, h // group, j * block_k:min((j + 1) * block_k, S)].double()
        return torch.maximum(q_sum * keys.max(0).values, q_sum * keys.min(0).values).sum().item()

    torch.manual_seed(3)
    q, k = torch.randn(1, 4, 600, 8), torch.randn(1, 2, 600, 8)
    config = MaskConfig(block_q=8, block_k=8, top_k=4, estimator="shortlist")
    library = shortlist.shortlist_select(q, k, config).indices
    with prescore.bound_prescore():
        got = shortlist.shortlist_select(q, k, config).indices
    monkeypatch.setattr(reference, "_pre_score", loop_bound)
    assert torch.equal(got, reference.shortlist_reference(q, k, config).indices)
    assert not torch.equal(got, library)  # the bound ranks otherwise than the Gaussian guess here
    assert torch.equal(shortlist.shortlist_select(q, k, config).indices, library)  # restored

    count = torch.tensor([3, 14, 60, 960])
    rule = shortlist.shortlist_sizes
    with prescore.bound_prescore(min_width=4):
        assert shortlist.shortlist_sizes(count, 2).tolist() == [3, 12, 20, 36]  # 4 * max(ceil(log2(count/2)), 2)
        assert torch.equal(shortlist.shortlist_sizes(count, 6), rule(count, 6))  # m >= 4: the rule's
        assert torch.equal(shortlist.shortlist_sizes(count, 1), rule(count, 1))
    assert shortlist.shortlist_sizes is rule


def test_long_rows_counts_the_oracles_middle_picks_kept():
    """bench/long_rows.py's ``kept``: only the oracle's middle picks count (sink 0 and the local block are in
    every row), a row counts as whole when all of them are kept, and only the rows asked for are read."""
    long_rows = _bench_module("long_rows")
    oracle = torch.tensor([[[0, 3, 5, 9], [0, 2, 7, 9], [0, 1, 2, 3]]])  # [Hq 1, nQ 3, k 4]
    selected = torch.tensor([[[0, 3, 4, 9], [0, 2, 7, 9], [0, 1, 2, 3]]])
    first, end = torch.tensor([1, 1, 1]), torch.tensor([9, 9, 3])  # middle [1, 9) in rows 0 and 1
    assert long_rows.kept(selected, oracle, torch.tensor([0, 1]), first, end) == (3, 4, 1, 2)
    assert long_rows.kept(oracle, oracle, torch.tensor([0]), first, end) == (2, 2, 1, 1)
    shortlist = torch.zeros(1, 3, 10, dtype=torch.bool)
    shortlist[0, 0, [3, 4]] = shortlist[0, 1, [2, 7]] = True
    assert long_rows.held(shortlist, oracle, torch.tensor([0, 1]), first, end) == 3  # 3 of row 0, 2 and 7 of 1


def test_long_rows_ranks_among_the_middle_ties_to_the_lower_block():
    """bench/long_rows.py's ``ranks``: 0 = best among a row's middle, ties to the lower block, blocks outside
    the middle after every middle block."""
    long_rows = _bench_module("long_rows")
    middle = torch.tensor([[False, True, True, True, True, False]])
    got = long_rows.ranks(torch.tensor([[[9.0, 1.0, 3.0, 3.0, 2.0, 8.0]]]), middle)
    assert got[0, 0, 1:5].tolist() == [3, 0, 1, 2] and set(got[0, 0, [0, 5]].tolist()) == {4, 5}


def test_long_rows_merge_takes_the_better_rank_of_either_pre_score():
    """``merged_scores``: blocks ordered by their better rank under the guess or the bound, ties by the guess's
    rank, so the merge's top 2 hold each pre-score's best block."""
    long_rows = _bench_module("long_rows")
    middle = torch.ones(1, 4, dtype=torch.bool)
    guess = torch.tensor([[[4.0, 3.0, 2.0, 1.0]]])  # ranks 0 1 2 3
    bound = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])  # ranks 3 2 1 0
    merged = long_rows.merged_scores(long_rows.ranks(guess, middle), long_rows.ranks(bound, middle))
    order = long_rows.ranks(merged, middle)[0, 0]
    assert order.tolist() == [0, 2, 3, 1]  # block 0 (guess's best), block 3 (bound's best), 1, 2


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    from sparsetrace.cli import main

    out = tmp_path / "run"
    code = main(["niah", "--model", "smollm2-135m", "--variant", "niah_single_2", "--lengths", "600",
                 "--depths", "0,100", "--top-k", "8,dense", "--max-new-tokens", "10",
                 "--out", str(out)])
    assert code == 0
    cases = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert len(cases) == 2
    for c in cases:
        assert {"id", "variant", "length", "depth", "input", "answers", "needle_token_spans"} <= set(c)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert list(rows[0]) == ["id", "variant", "length", "depth", "k", "sparsity", "kept_blocks", "capped_share",
                             "score", "criterion", "output", "num_tokens", "seconds"]
    assert sorted(r["k"] for r in rows) == ["8", "8", "dense", "dense"]
    for r in rows:  # kept blocks per row: none recorded for dense, at most k and more than the forced 2 at k 8
        assert (r["kept_blocks"] == "") if r["k"] == "dense" else 2 < float(r["kept_blocks"]) <= 8, r
        assert r["capped_share"] == "", r  # no coverage budget, nothing capped
    answers = {c["id"]: c["answers"] for c in cases}
    for r in rows:
        assert 0.0 <= float(r["score"]) <= 1.0
        assert (float(r["sparsity"]) > 0.3) == (r["k"] == "8")
        if r["k"] == "dense":  # the dense model retrieves the needle: the sweep has something to lose
            assert float(r["score"]) == 1.0 and all(a in r["output"] for a in answers[r["id"]]), r
    data = json.loads((out / "routes.json").read_text())
    entry = data["cases"][0]
    assert len(entry["needle_mass"]) == 30 and len(entry["needle_mass"][0]) == 9
    assert "route" in entry and "comparison" in data
    for png in ("scores.png", "needle_mass.png", "routes.png", "heads.png"):
        assert (out / png).stat().st_size > 1000


@pytest.mark.slow
def test_cli_under_a_coverage_budget_records_kept_blocks_and_capped_rows(tmp_path):
    """`niah --coverage 0.9 --max-k 8`: the budget row keeps fewer blocks than max-k on average and records the
    share of rows capped at max-k; a capped row keeps all 8 blocks, so the mean kept is at least 8 x that share."""
    from sparsetrace.cli import main

    out = tmp_path / "run"
    assert main(["niah", "--model", "smollm2-135m", "--variant", "niah_single_2", "--lengths", "600", "--depths",
                 "50", "--top-k", "8,dense", "--coverage", "0.9", "--max-k", "8", "--max-new-tokens", "10",
                 "--out", str(out)]) == 0
    with open(out / "results.csv") as f:
        rows = {r["k"]: r for r in csv.DictReader(f)}
    assert rows["dense"]["kept_blocks"] == rows["dense"]["capped_share"] == ""
    kept, capped = float(rows["8"]["kept_blocks"]), float(rows["8"]["capped_share"])
    assert 2 < kept < 8 and 0 <= capped < 1, rows["8"]  # measured 4.16 blocks, 0.125 capped (2026-12-05)
    assert kept >= 8 * capped, rows["8"]


@pytest.mark.slow
def test_cli_over_two_ranks_writes_what_one_process_writes(tmp_path):
    """`torchrun --nproc-per-node 2 -m sparsetrace.cli niah` (gloo, both ranks on the CPU) shares the cases
    and writes the files one process writes: results.csv equal row for row but the timing column, routes.json
    and cases.jsonl byte for byte."""
    import subprocess
    import sys

    from sparsetrace.cli import main

    flags = ["niah", "--model", "smollm2-135m", "--variant", "niah_single_2", "--lengths", "300",
             "--depths", "0,100", "--top-k", "8,dense", "--max-new-tokens", "10", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks run (and 5x faster than 2 threads on a busy 2-core CI box)
    try:
        assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "sparsetrace.cli", *flags, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=child_env())
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 0/2: [1/2]" in two.stdout and "rank 1/2: [2/2]" in two.stdout  # one case each

    def rows(run):
        with open(tmp_path / run / "results.csv") as f:
            return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]

    assert len(rows("one")) == 4 and rows("one") == rows("two")
    for name in ("routes.json", "cases.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert not (tmp_path / "two" / "parts").exists()
