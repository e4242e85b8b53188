"""Thought anchors: sentence splitting, token spans, sentence matrices from block masks against a
brute-force token-level rebuild, scores, bad inputs, and (slow) the real model: a trace that keeps
every block against the dense reference, and sentence suppression through the sparse attention."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, random_block_rows

from sparsetrace.analysis import anchors as A
from sparsetrace.analysis import sentences as S
from sparsetrace.store import Trace

# --------------------------------------------------------------------------- splitting

def texts(text, **kw):
    return [s.text for s in S.split_sentences(text, **kw)]


def test_split_after_terminal_punctuation_followed_by_whitespace():
    text = "The first one is here. Is this the second? Yes it is!\nAnd the fourth one."
    assert texts(text) == ["The first one is here.", "Is this the second?", "Yes it is!",
                           "And the fourth one."]


def test_no_split_without_whitespace_after_punctuation_or_at_single_newline():
    text = "Pi is about 3.14 and e.g.this stays\nalong with this line"
    assert texts(text) == [text]


def test_split_at_blank_lines():
    text = "Step one computes 6 * 2 = 12\n\nStep two adds 12 + 3 = 15\n  \nThe end of it all"
    assert texts(text) == ["Step one computes 6 * 2 = 12", "Step two adds 12 + 3 = 15",
                           "The end of it all"]


def test_short_fragments_merge_into_the_next_and_the_last_into_the_previous():
    assert texts("Ok. So. This is long enough. Fine.") == ["Ok. So. This is long enough. Fine."]
    assert texts("Hm. This sentence is long enough. And this one too.") == [
        "Hm. This sentence is long enough.", "And this one too."]
    assert texts("This sentence is long enough. Yes.") == ["This sentence is long enough. Yes."]


def test_think_tags_are_stripped_and_end_sentences():
    text = "<think>Let me think about it\n</think>The answer is forty two."
    got = S.split_sentences(text)
    assert [s.text for s in got] == ["Let me think about it", "The answer is forty two."]
    assert all("<" not in text[s.char_start:s.char_end] for s in got)


def test_char_spans_index_the_text_and_regions_restrict_the_split():
    text = "<|user|>What is two plus two? Tell me.<|assistant|>It is 4. Surely four."
    regions = [(8, 38), (51, len(text))]
    got = S.split_sentences(text, regions)
    assert [s.text for s in got] == ["What is two plus two? Tell me.", "It is 4. Surely four."]
    for s in got:
        assert text[s.char_start:s.char_end] == s.text
    assert [s.index for s in got] == [0, 1]


def test_token_spans_from_offsets():
    # words with a leading space belong to the sentence their letters are in
    text = "Alpha beta gamma. Delta epsilon zeta.\n\nEta theta iota."
    words = [(0, 5), (5, 10), (10, 16), (16, 17), (17, 23), (23, 31), (31, 36), (36, 37),
             (37, 39), (39, 42), (42, 48), (48, 53), (53, 54)]
    sentences = S.map_to_tokens(S.split_sentences(text), torch.tensor(words))
    assert [(s.token_start, s.token_end) for s in sentences] == [(0, 4), (4, 8), (9, 13)]
    # sentences past the tokens (a --max-tokens cut) are dropped; a cut one is kept, shortened
    cut = S.map_to_tokens(S.split_sentences(text), torch.tensor(words[:6]))
    assert [(s.token_start, s.token_end) for s in cut] == [(0, 4), (4, 6)]


def reference_split(text, regions=None, min_chars=S.MIN_CHARS):
    """The splitter as first written (a look-behind cut, a merge that pops from a list): what the fast
    one must equal."""
    import itertools
    import re

    cut = re.compile(r"(?<=[.?!])(?=\s)|\n[ \t]*\n")
    out = []
    for start, end in [(0, len(text))] if regions is None else regions:
        pieces, cuts = [], [start]
        for m in re.compile(r"</?think>").finditer(text, start, end):
            cuts += [m.start(), m.end()]
        cuts.append(end)
        for a, b in zip(cuts[::2], cuts[1::2]):
            edges = [a] + [m.end() for m in cut.finditer(text, a, b)] + [b]
            for u, v in itertools.pairwise(edges):
                u += len(text[u:v]) - len(text[u:v].lstrip())
                v -= len(text[u:v]) - len(text[u:v].rstrip())
                if v > u:
                    pieces.append([u, v, text[u:v]])
        i = 0
        while i < len(pieces) and len(pieces) > 1:
            if len(pieces[i][2]) >= min_chars:
                i += 1
            elif i == len(pieces) - 1:
                prev = pieces[i - 1]
                pieces[i - 1] = [prev[0], pieces[i][1], prev[2] + " " + pieces[i][2]]
                pieces.pop(i)
            else:
                pieces[i + 1] = [pieces[i][0], pieces[i + 1][1], pieces[i][2] + " " + pieces[i + 1][2]]
                pieces.pop(i)
        for u, v, t in pieces:
            out.append(S.Sentence(len(out), t, u, v))
    return out


def word_offsets(text):
    """Tokens as words with their leading whitespace (the last one may be whitespace alone)."""
    import re

    spans = [(m.start(), m.end()) for m in re.finditer(r"\s*\S+|\s+$", text)]
    return torch.tensor(spans or [(0, 0)], dtype=torch.long).view(-1, 2)


def test_fast_split_and_token_spans_equal_the_reference_on_awkward_texts():
    """split_sentences (one pass, cuts found at the marks) and text_passages (arrays, a running maximum
    for the token walk) against the reference splitter and map_to_tokens, on random texts of marks,
    unicode whitespace, blank lines with spaces, think tags and short fragments, with regions."""
    import random

    rng = random.Random(0)
    parts = ["a", "bc", " ", ".", "?", "!", "\n", "\t", "\u00a0", "\u2003", "é", "<think>", "</think>",
             " \n \n", "word ", "A sentence. "]
    checked = 0
    for _ in range(600):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(text) + 1), 4)) if len(text) > 3 else None
        for min_chars in (0, 5, 10, 30):
            for regions in (None, None if cuts is None else [(cuts[0], cuts[1]), (cuts[2], cuts[3])]):
                want = reference_split(text, regions, min_chars)
                assert S.split_sentences(text, regions, min_chars=min_chars) == want, (text, regions)
            offsets = word_offsets(text)
            want = S.map_to_tokens(reference_split(text, None, min_chars), offsets)
            got = S.text_passages(text, offsets, min_chars=min_chars)
            assert list(got) == want and got.token_start.tolist() == [s.token_start for s in want], text
            paragraphs = S.map_to_tokens(S.split_paragraphs(text), offsets)
            assert list(S.text_passages(text, offsets, "paragraph")) == paragraphs, text
            checked += 1
    print(f"{checked} texts: split, token spans and paragraphs equal the reference")


def test_fast_split_equals_the_reference_on_a_long_text():
    from sparsetrace.viz.synthetic import synthetic_text

    text, _, offsets = synthetic_text(20_000, 3)
    text = text[:40_000] + "\n\n  A new paragraph. <think>Thinking.</think> " + text[40_000:]
    want = reference_split(text)
    assert S.split_sentences(text) == want and len(want) > 100
    got = S.text_passages(text, word_offsets(text))
    assert list(got) == S.map_to_tokens(want, word_offsets(text))
    assert got[-1] == got[len(got) - 1] and got[1:3] == [got[1], got[2]]


def test_token_spans_with_the_real_tokenizer(smollm):
    from sparsetrace.tracing.tracer import tokenize

    tok = smollm[1]

    text = "Tom has 3 apples. He buys 4 more!\n\nHow many does he have now? He has 7 apples."
    ids, offsets = tokenize(tok, text)
    sentences = S.map_to_tokens(S.split_sentences(text), offsets)
    assert len(sentences) == 4
    for s in sentences:
        decoded = tok.decode(ids[s.token_start:s.token_end]).strip()
        assert decoded == s.text, (decoded, s.text)


# --------------------------------------------------------------------------- sentence matrices

def random_trace(T, bq, bk, k, H=3, L=2, seed=0, n_sentences=8, gap=True):
    """A Trace with random sorted/-1-padded rows and masses summing to 1, and sentence spans with
    a token outside every sentence (the 'gap'), like chat-template markup."""
    idx, mass = random_block_rows(L, H, T, bq, bk, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    evens = torch.arange(2, T - 1, 2)  # sentences of 2+ tokens
    cuts = sorted(evens[torch.randperm(evens.numel(), generator=g)[: n_sentences - 1]].tolist())
    bounds = [1 if gap else 0] + cuts + [T]
    sentences = [S.Sentence(i, f"s{i}", 0, 0, bounds[i] + (1 if gap and i == 3 else 0),
                            bounds[i + 1]) for i in range(len(bounds) - 1)]
    trace = Trace.from_arrays(idx, mass, block_q=bq, block_k=bk,
                              tokens=torch.zeros(T, dtype=torch.long))
    return trace, sentences


def brute_force_matrix(indices, mass, sentences, T, bq, bk, sink_prior=False):
    """Expand every kept block to token level with loops, under the documented approximation:
    each query of the block gets mass m on the block, spread uniformly over the keys it may see
    (rescaled to the queries that see any), then average over sentence pairs."""
    H, nQ, _ = indices.shape
    rows, masses = indices.tolist(), mass.double().tolist()
    att = [[[0.0] * T for _ in range(T)] for _ in range(H)]  # plain floats: loops stay fast
    for h in range(H):
        for i in range(nQ):
            q0, q1 = i * bq, min((i + 1) * bq, T)
            for j, m in zip(rows[h][i], masses[h][i]):
                if j < 0:
                    continue
                k0, k1 = j * bk, min((j + 1) * bk, T)
                if sink_prior and j == 0 and k1 - 1 <= q0:  # the sink block: all on token 0
                    for t in range(q0, q1):
                        att[h][t][0] += m
                    continue
                seen = {t: max(0, min(k1, t + 1) - k0) for t in range(q0, q1)}
                seeing = sum(1 for n in seen.values() if n > 0)
                for t, n in seen.items():
                    for s in range(k0, k0 + n):
                        att[h][t][s] += m * (q1 - q0) / seeing / n
    att = torch.tensor(att, dtype=torch.float64)
    M = torch.zeros(H, len(sentences), len(sentences), dtype=torch.float64)
    for a in sentences:
        for b in sentences:
            region = att[:, a.token_start:a.token_end, b.token_start:b.token_end]
            M[:, a.index, b.index] = region.mean((1, 2))
    return M


@pytest.mark.parametrize("T,bq,bk,k,sink", [(61, 8, 8, 4, False), (50, 4, 8, 3, False),
                                            (47, 8, 4, 6, False), (40, 5, 3, 5, False),
                                            (33, 16, 16, 2, False), (61, 8, 8, 4, True),
                                            (47, 8, 4, 6, True)])
def test_sentence_matrix_matches_brute_force(T, bq, bk, k, sink):
    for gap in (True, False):  # token 0 outside every sentence, or in the first one
        trace, sentences = random_trace(T, bq, bk, k, seed=T + bq, gap=gap)
        for layer in range(trace.num_layers):
            got = A.layer_sentence_matrices(trace, layer, sentences, sink_prior=sink)
            want = brute_force_matrix(*trace.layer(layer), sentences, T, bq, bk, sink)
            assert_close(f"M T={T} bq={bq} bk={bk} sink={sink} gap={gap} layer {layer}", got, want,
                         atol=1e-12)


def test_row_sums_of_sums_count_the_tokens_when_all_keys_are_in_sentences():
    # every query row sums to 1, so sum_b S[a, b] = |a| when every key is inside some sentence
    trace, sentences = random_trace(45, 8, 8, 4, gap=False)
    indices, mass = trace.layer(0)
    sums = A.block_sentence_sums(indices, mass, sentences, 45, 8, 8)
    assert_close("row sums", sums.sum(-1), S.sentence_lengths(sentences).expand(3, -1), atol=1e-5)


def test_vertical_scores_kurtosis_and_receivers():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    M = torch.rand(3, 4, 9, 9, generator=g, dtype=torch.float64)
    v = A.vertical_scores(M)
    for j in range(9):
        rows = [i for i in range(9) if i >= j + 4]
        want = M[..., rows, j].mean(-1) if rows else torch.full((3, 4), float("nan"), dtype=torch.float64)
        assert torch.allclose(v[..., j], want, equal_nan=True)
    k = A.head_kurtosis(v)
    want = scipy_stats.kurtosis(v.numpy(), axis=-1, fisher=True, bias=True, nan_policy="omit")
    assert_close("kurtosis", k, torch.as_tensor(__import__("numpy").asarray(want)), atol=1e-9)
    k2 = torch.zeros(3, 4)
    k2[2, 1] = 100.0  # a second trace pulls its own best head in front when averaged
    heads = A.receiver_heads([k, k2], top=3)
    assert heads[0] == (2, 1) and len(set(heads)) == 3
    assert A.receiver_heads(k, top=1)[0] == tuple(int(x) for x in divmod(int(k.argmax()), 4))
    scores = A.receiver_scores(v, heads)
    want = torch.stack([v[layer, h] for layer, h in heads]).mean(0)
    assert_close("receiver", scores[:5], want[:5], atol=0)
    assert torch.isnan(scores[5:]).all()  # nothing 4+ sentences after the last four


def test_kurtosis_can_leave_out_the_first_and_last_sentences():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(2)
    v = A.vertical_scores(torch.rand(2, 3, 20, 20, generator=g, dtype=torch.float64))
    v[0, 0, 0] = 50.0  # a sink-like first sentence decides this head's kurtosis ...
    plain, dropped = A.head_kurtosis(v), A.head_kurtosis(v, drop_first=2, drop_last=5)
    want = scipy_stats.kurtosis(v[..., 2:15].numpy(), axis=-1, fisher=True, bias=True, nan_policy="omit")
    assert_close("kurtosis without the first 2 and last 5", dropped,
                 torch.as_tensor(__import__("numpy").asarray(want)), atol=1e-9)
    assert A.receiver_heads(plain, top=1) == [(0, 0)] and A.receiver_heads(dropped, top=1) != [(0, 0)]
    with pytest.raises(ValueError, match=r"leaves 3 with a vertical score; kurtosis needs at least 4"):
        A.head_kurtosis(v, drop_first=10, drop_last=7)  # sentences 10..12 left


def test_analyze_runs_on_a_synthetic_trace_with_text():
    text = " ".join(f"Sentence number {i} says something." for i in range(12))
    words = [(m.start(), m.end()) for m in __import__("re").finditer(r"\S+", text)]
    T = len(words)
    trace, _ = random_trace(T, 4, 4, 5)
    trace.text, trace.token_offsets = text, torch.tensor(words)
    result = A.analyze(trace, top=5)
    assert len(result.sentences) == 12 and result.vertical.shape == (2, 3, 12)
    assert torch.isnan(result.scores[-4:]).all() and not torch.isnan(result.scores[:-4]).any()
    assert len(result.heads) == 5 and result.summary()["num_sentences"] == 12
    both = A.analyze([trace, trace], top=5)
    assert both[0].heads == result.heads


def test_compare_counts_shared_receiver_heads_and_rank_agreement():
    g = torch.Generator().manual_seed(4)
    texts = [torch.rand(3, 5, 14, generator=g, dtype=torch.float64) for _ in range(3)]
    same = A.compare(texts, texts, top=4)
    assert same["overlap"] == 4 and same["heads"] == same["reference_heads"]
    assert same["rho_heads"] == pytest.approx(1.0) and same["rho_receiver"] == pytest.approx(1.0)
    # Negated scores keep each head's kurtosis (an even moment) but reverse every ranking: the same
    # heads, Spearman -1.
    flipped = A.compare([-v for v in texts], texts, top=4)
    assert flipped["overlap"] == 4 and flipped["rho_heads"] == pytest.approx(-1.0)
    # Against independent scores: the overlap is the brute-force intersection of the two top-4s,
    # and the Spearman the plain mean over texts and the reference's heads.
    other = [torch.rand(3, 5, 14, generator=g, dtype=torch.float64) for _ in range(3)]
    got = A.compare(texts, other, top=4)
    mine = A.receiver_heads([A.head_kurtosis(v) for v in texts], 4)
    theirs = A.receiver_heads([A.head_kurtosis(v) for v in other], 4)
    assert got["overlap"] == len(set(mine) & set(theirs))
    want = sum(spearman(a[lh], b[lh]) for a, b in zip(texts, other) for lh in theirs) / 12
    assert got["rho_heads"] == pytest.approx(want)
    with pytest.raises(ValueError, match="same texts on both sides"):
        A.compare(texts, other[:2])
    with pytest.raises(ValueError, match="same model and the same sentences"):
        A.compare(texts, [v[..., :10] for v in other])


# --------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_one_sentence_value_errors():
    trace, _ = random_trace(40, 4, 4, 3)
    with pytest.raises(ValueError, match="no text and character offsets"):
        S.trace_sentences(trace)
    trace.text, trace.token_offsets = "Only one sentence here", torch.tensor([[0, 4]] * 40)
    with pytest.raises(ValueError, match="at least two"):
        S.trace_sentences(trace)
    short = [S.Sentence(i, "x", 0, 0, 3 * i, 3 * i + 3) for i in range(10)]
    with pytest.raises(ValueError, match="too coarse"):
        S.check_block_resolution(short, 64)
    with pytest.warns(UserWarning, match="coarse"):
        S.check_block_resolution(short, 8)


# --------------------------------------------------------------------------- real model (slow)

@pytest.fixture(scope="module")
def small_model():
    """SmolLM2-135M cut to its first 4 layers (real weights; the method does not care about depth),
    so the real-model checks stay within seconds on a shared CPU."""
    from sparsetrace.tracing.models import load_model

    model, tokenizer = load_model()
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    return model, tokenizer


@pytest.fixture(scope="module")
def gsm_case(small_model):
    from sparsetrace.datasets.gsm import gsm_text
    from sparsetrace.tracing.tracer import tokenize

    _, tokenizer = small_model
    text, regions, _ = gsm_text(tokenizer, min_tokens=512, seed=3)
    ids, offsets = tokenize(tokenizer, text, 512)
    return text, regions, ids, offsets


def spearman(a, b):
    ok = ~(torch.isnan(a) | torch.isnan(b))
    ra = torch.argsort(torch.argsort(a[ok])).double()
    rb = torch.argsort(torch.argsort(b[ok])).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.mark.slow
def test_all_blocks_kept_matches_the_dense_reference(small_model, gsm_case):
    from sparsetrace.config import TraceConfig
    from sparsetrace.runs.anchors import dense_sentence_matrices
    from sparsetrace.tracing.tracer import trace_ids

    model, _ = small_model
    text, regions, ids, offsets = gsm_case
    T = ids.numel()
    config = TraceConfig.of(block_size=16, top_k=math.ceil(T / 16), chunk_size=256)  # keeps every block
    trace = trace_ids(model, ids, config, text=text, token_offsets=offsets)
    trace.update_manifest(anchors_regions=[list(r) for r in regions])
    sentences = S.trace_sentences(trace)
    sparse = A.sentence_matrices(trace, sentences)
    dense, spread = dense_sentence_matrices(model, ids, sentences, block=(16, 16))
    # Same masses through the same spread: equal up to float16 mass storage (in memory: float32)
    # and sparse-vs-dense float32 kernels.
    assert_close("sparse (all blocks) vs block-spread dense", sparse, spread, rtol=2e-3)
    # Against exact dense attention only the within-block spread differs. It smears attention over
    # ~16 tokens while sentences here are ~13, so per-head rankings of vertical scores only roughly
    # agree at block 16, and agree closely at block 4 (the same dense run, spread over 4 tokens).
    _, spread4 = dense_sentence_matrices(model, ids, sentences, block=(4, 4))
    v_dense = A.vertical_scores(dense)
    rho16, rho4 = (torch.tensor([spearman(v[layer, h], v_dense[layer, h]) for layer in range(4)
                                 for h in range(trace.num_heads)]).mean()
                   for v in (A.vertical_scores(sparse), A.vertical_scores(spread4)))
    print(f"T={T}, {len(sentences)} sentences; mean Spearman of vertical scores vs dense: "
          f"block 16 (sparse, all kept) {rho16:.3f}, block-4 spread {rho4:.3f}")
    assert rho16 > 0.3 and rho4 > 0.6 and rho4 > rho16 + 0.1
    # Row sums: a sentence's queries put at most all their attention on sentences.
    assert ((dense * S.sentence_lengths(sentences)).sum(-1) <= 1 + 1e-6).all()
    # With one-token blocks nothing is spread: a trace keeping every block gives the dense matrices
    # themselves, through the whole sparse pipeline (selection, attention, store, sentence sums).
    n = 160
    one = trace_ids(model, ids[:n], TraceConfig.of(block_size=1, top_k=n, chunk_size=n), text=text,
                    token_offsets=offsets[:n])
    one.update_manifest(anchors_regions=[list(r) for r in regions])
    first = S.trace_sentences(one, check_resolution=False)
    exact = dense_sentence_matrices(model, ids[:n], first)
    assert_close("block-1 trace vs dense sentence matrices", A.sentence_matrices(one, first), exact,
                 rtol=2e-3, atol=1e-6)


@pytest.mark.slow
def test_suppression_kl_is_nonnegative_and_zero_before_the_sentence(small_model, gsm_case):
    from sparsetrace.config import TraceConfig
    from sparsetrace.runs.suppression import remove_blocks, sentence_blocks, suppression_kl
    from sparsetrace.selection.blocks import BlockMask
    from sparsetrace.tracing.tracer import trace_ids

    model, _ = small_model
    text, regions, ids, offsets = gsm_case
    ids, offsets = ids[:256], offsets[:256]
    config = TraceConfig.of(block_size=16, top_k=6, chunk_size=128)
    trace = trace_ids(model, ids, config, text=text, token_offsets=offsets)
    trace.update_manifest(anchors_regions=[list(r) for r in regions])
    sentences = S.trace_sentences(trace, check_resolution=False)
    owned = [s.index for s in sentences if sentence_blocks(s, 16, 256)]
    which = [owned[1], owned[-3]]
    heads = [(1, 0), (2, 3), (3, 5)]
    for suppress_heads, chosen in ((None, which), (heads, which[:1])):
        out = suppression_kl(model, ids, sentences, config, which=chosen, heads=suppress_heads)
        for s in chosen:
            per = out["per_position"][s]
            start = sentences[s].token_start
            assert out["blocks"][s] > 0
            assert per.min() >= -1e-6, f"negative KL {per.min():.2e}"
            assert per[:start].abs().max() <= 1e-6, "suppression changed positions before it"
            assert per[start:].max() > 1e-6, "suppression changed nothing"
            assert out["kl"][s] > 0
        print(f"suppress {suppress_heads}: KL {out['kl'][chosen].tolist()}")

    # remove_blocks: only listed blocks, only strictly earlier than the query block, rows re-packed
    idx = torch.tensor([[[[0, 2, 3, -1], [0, 1, 3, 4], [1, 3, 4, 5]]]], dtype=torch.int32)
    edited = remove_blocks(BlockMask(idx, 4, 4), torch.tensor([3, 4]), first_query_block=3)
    assert edited.indices.tolist() == [[[[0, 2, 3, -1], [0, 1, 4, -1], [1, 5, -1, -1]]]]
    same = remove_blocks(BlockMask(idx, 4, 4), torch.tensor([3]), 3, heads=[])  # no head chosen
    assert torch.equal(same.indices, idx)


@pytest.mark.slow
def test_cli_writes_tables_plots_suppression_and_compares_two_traces(tmp_path, capsys, smollm):
    import csv
    import json

    from sparsetrace.cli import main
    from sparsetrace.config import TraceConfig
    from sparsetrace.tracing.tracer import tokenize, trace_ids

    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--gsm", "2", "--max-tokens", "320", "--block-size", "8", "--chunk-size", "320"]
    assert main(["anchors", *common, "--top-k", "6", "--suppress", "--out", str(a)]) == 0
    with open(a / "sentences.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "text", "token_start", "token_end", "vertical_score",
                             "receiver_score", "suppression_kl", "suppressed_blocks"]
    spans = [(int(r["token_start"]), int(r["token_end"])) for r in rows]
    assert all(s < e <= n for (s, e), (n, _) in zip(spans, spans[1:] + [(320, 0)]))
    kls = [float(r["suppression_kl"]) for r in rows if r["suppression_kl"]]
    assert len(kls) >= len(rows) - 4 and min(kls) >= 0 and max(kls) > 0
    assert all(r["receiver_score"] == "" for r in rows[-4:])  # nothing 4+ sentences later
    with open(a / "heads.csv", encoding="utf-8") as f:
        heads = list(csv.DictReader(f))
    assert len(heads) == 30 * 9 and sum(h["receiver_rank"] != "" for h in heads) == 20
    for name in ("receiver_scores.png", "receiver_heads.png", "kurtosis.png"):
        assert (a / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((a / "anchors.json").read_text())
    assert len(summary["receiver_heads"]) == 20 and summary["suppression"]["mean_kl"] > 0

    # The same text at twice the k, then the check that needs no dense run.
    assert main(["anchors", *common, "--top-k", "12", "--no-plots", "--out", str(b)]) == 0
    capsys.readouterr()
    for other, out in ((b, tmp_path / "c"), (a, tmp_path / "self")):
        assert main(["anchors", "--trace", str(a / "trace"), "--compare", str(other / "trace"),
                     "--no-plots", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    versus = json.loads((tmp_path / "c" / "anchors.json").read_text())["compare"]
    def receivers(folder):
        with open(folder / "heads.csv", encoding="utf-8") as f:
            return {(int(h["layer"]), int(h["head"])) for h in csv.DictReader(f) if h["receiver_rank"]}

    # The comparison counts exactly the receiver heads the two runs chose on their own.
    assert versus["top_k"] == 12
    assert versus["receiver_heads_in_common"] == len(receivers(a) & receivers(b))
    assert -1 <= versus["spearman_vertical_on_its_heads"] <= 1
    itself = json.loads((tmp_path / "self" / "anchors.json").read_text())["compare"]
    assert itself["receiver_heads_in_common"] == 20 and itself["stable"]
    assert itself["spearman_vertical_on_its_heads"] == pytest.approx(1.0)
    assert versus["stable"] == (versus["receiver_heads_in_common"] >= 16
                                and versus["spearman_vertical_on_its_heads"] >= 0.9)
    assert ("too sparse to read anchors" in printed) == (not versus["stable"])
    assert "against k=12  receiver heads in common" in printed
    print(f"k=6 against k=12: {versus}")

    # Bad input: one sentence, exit 2, nothing written.
    model, tokenizer = smollm
    ids, _ = tokenize(tokenizer, "No text is kept in this trace. " * 20, 64)
    bare = tmp_path / "bare"
    trace_ids(model, ids, TraceConfig.of(block_size=8, top_k=4, chunk_size=64), out=bare)
    cases = [(["--trace", str(a / "trace"), "--compare", str(bare)], "other tokens"),
             (["--trace", str(bare)], "no text and character offsets"),
             (["--trace", str(a / "trace"), "--compare", str(tmp_path / "missing")], "missing")]
    for argv, says in cases:
        out = tmp_path / "refused"
        assert main(["anchors", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and "Traceback" not in err
        assert not out.exists()
