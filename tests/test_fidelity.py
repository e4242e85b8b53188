"""Fidelity: sparse vs dense on real weights, the k search, the CLI, and Gemma 3's correctness anchor.

The search logic and the refusals are tested without running a model (fakes stand in for the runs);
the real-model tests keep to a few hundred tokens, and Gemma's anchor to ~1100 (past its 512 window).
"""

from __future__ import annotations

import json

import pytest
import torch

from sparsetrace import Trace, load_model
from sparsetrace.cli import main
from sparsetrace.config import TraceConfig
from sparsetrace.datasets.essays import haystack_text
from sparsetrace.runs import fidelity
from sparsetrace.runs.fidelity import FidelityResult, check, dense_reference, search_k
from sparsetrace.tracing.backend import sparse_model
from sparsetrace.tracing.tracer import tokenize, trace_ids

KEYS = {"criterion_passed", "top_k", "block_size", "sparsity", "top1_agreement", "kl", "kl_max",
        "dense_tokens", "sparse_tokens", "n_tokens", "last_n", "model_id"}


@pytest.fixture(scope="module")
def essay_ids(smollm):
    _, tokenizer = smollm
    ids, _ = tokenize(tokenizer, haystack_text(4000), max_tokens=256)
    assert ids.shape[0] == 256
    return ids


@pytest.fixture
def essay_file(tmp_path):
    path = tmp_path / "essay.txt"
    path.write_text(haystack_text(2000), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- real model

@pytest.mark.slow
def test_every_block_kept_matches_dense(smollm, essay_ids, tmp_path):
    """Keeping every block is the dense model: same two tokens, KL ~ 0, top-1 agreement 1; and the
    result lands in the manifest of a trace of the same input and config."""
    model, _ = smollm
    ids = essay_ids[:192]
    config = TraceConfig.of(block_size=32, top_k=6, chunk_size=128)  # 6 blocks: all of them
    trace = trace_ids(model, ids, config, out=tmp_path / "trace")
    r = check(model, ids, config, last_n=64, trace=tmp_path / "trace", model_id="smollm2-135m")
    print(r)
    assert r.criterion_passed and r.sparse_tokens == r.dense_tokens
    assert r.sparsity == 0.0 == trace.sparsity
    assert r.top1_agreement == 1.0
    assert 0.0 <= r.kl <= r.kl_max < 1e-6
    assert set(r.to_dict()) >= KEYS and r.last_n == 64 and r.n_tokens == 192
    assert Trace.load(tmp_path / "trace").fidelity == json.loads(json.dumps(r.to_dict()))


@pytest.mark.slow
def test_tiny_k_diverges_more_than_big_k(smollm, essay_ids):
    model, _ = smollm
    ids = essay_ids[:192]
    base = TraceConfig.of(block_size=16, chunk_size=192)
    dense = dense_reference(model, ids, chunk_size=192, last_n=64)
    tiny = check(model, ids, base.replace(top_k=3), dense=dense)
    big = check(model, ids, base.replace(top_k=10), dense=dense)
    print(f"top_k 3: {tiny}\ntop_k 10: {big}")
    assert tiny.sparsity > big.sparsity > 0.0
    assert tiny.kl > big.kl
    assert tiny.dense_tokens == big.dense_tokens == dense.tokens


@pytest.mark.slow
def test_search_k_on_real_weights(smollm):
    """The k found is checked against every k of the range by brute force: it passes, each probe equals
    an independent check at its k, every k the search ruled out below it fails, and when the criterion
    is monotone over the range the k found is the smallest passing one."""
    model, tokenizer = smollm
    ids, _ = tokenize(tokenizer, haystack_text(6000), max_tokens=320)  # here k=3 fails, 4..7 pass
    base = TraceConfig.of(block_size=16, chunk_size=320)
    seen: list[int] = []
    found = search_k(model, ids, base, k_min=3, k_max=7, on_probe=lambda r: seen.append(r.top_k))
    print(found.to_dict()["search"])
    brute = {k: check(model, ids, base.replace(top_k=k)) for k in range(3, 8)}
    print({k: (r.criterion_passed, round(r.kl, 4)) for k, r in brute.items()})
    assert brute[found.top_k].criterion_passed
    for probe in found.probes:
        want = brute[probe["top_k"]]
        assert probe["criterion_passed"] == want.criterion_passed and probe["kl"] == pytest.approx(want.kl)
    assert all(not brute[k].criterion_passed for k in seen if k < found.top_k)
    passing = [k for k in range(3, 8) if brute[k].criterion_passed]
    if passing == list(range(passing[0], 8)):  # monotone here: binary search must find the minimum
        assert found.top_k == passing[0]
    assert 3 <= found.top_k <= 7
    assert found.result.criterion_passed and found.result.top_k == found.top_k
    assert [p["top_k"] for p in found.probes] == seen and len(set(seen)) == len(seen)
    assert all(3 <= k <= 7 for k in seen) and found.top_k in seen
    assert found.sparsity == found.result.sparsity
    assert set(found.to_dict()) >= KEYS | {"search"}


@pytest.mark.slow
def test_cli_writes_json_and_records_in_a_trace(smollm, essay_file, tmp_path, capsys):
    out = tmp_path / "fid.json"
    rc = main(["fidelity", "--text-file", str(essay_file), "--max-tokens", "96", "--top-k", "3",
               "--last-n", "16", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data) >= KEYS
    assert data["top_k"] == 3 and data["n_tokens"] == 96 and data["last_n"] == 16
    assert "criterion" in capsys.readouterr().out

    trace_dir = tmp_path / "trace"
    assert main(["trace", "--text-file", str(essay_file), "--max-tokens", "96", "--top-k", "3",
                 "--out", str(trace_dir), "--no-progress"]) == 0
    assert main(["fidelity", "--trace", str(trace_dir), "--last-n", "16"]) == 0  # its own settings
    recorded = Trace.load(trace_dir).fidelity
    assert recorded["top_k"] == 3 and recorded["sparse_tokens"] == data["sparse_tokens"]
    rc = main(["fidelity", "--trace", str(trace_dir), "--top-k", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "--top-k 4 differs from the trace's 3" in err


# --------------------------------------------------------------------------- refusals (no model run)

def test_input_shorter_than_one_block_is_refused():
    with pytest.raises(ValueError, match="fewer than one block of 32"):
        check(None, torch.arange(20), TraceConfig.of(block_size=32))
    with pytest.raises(ValueError, match="fewer than one block"):
        search_k(None, torch.arange(20), TraceConfig.of(block_size=32))


def test_search_bounds_are_checked():
    ids = torch.arange(256)
    with pytest.raises(ValueError, match="k_min=6 exceeds k_max=4"):
        search_k(None, ids, TraceConfig.of(block_size=32), k_min=6, k_max=4)
    with pytest.raises(ValueError, match="raise --k-min to 3"):
        search_k(None, ids, TraceConfig.of(block_size=32), k_min=2, k_max=4)


@pytest.mark.slow
def test_dense_run_that_does_not_fit_is_refused(smollm):
    model, _ = smollm
    need = fidelity.dense_memory_bytes(model, 4096, 1024)
    assert need > fidelity.dense_memory_bytes(model, 2048, 1024) > 0
    with pytest.raises(ValueError, match=r"needs about .* GiB .* only 0.00 GiB is available"):
        check(model, torch.arange(4096), TraceConfig(), available_bytes=1000)
    with pytest.raises(ValueError, match="is available; lower --max-tokens"):
        search_k(model, torch.arange(4096), TraceConfig(), available_bytes=need - 1)
    assert fidelity.available_memory_bytes() > 0  # read from /proc/meminfo on Linux


def _fake_runs(monkeypatch, passes):
    """Replace the two runs by fakes: ``passes(k)`` decides the criterion; sparsity falls with k."""
    dense = fidelity.DenseReference(torch.zeros(4, 8), (1, 2), 256)
    monkeypatch.setattr(fidelity, "dense_reference", lambda *a, **kw: dense)

    def fake_check(model, ids, config, **kw):
        k = config.mask.top_k
        ok = passes(k)
        return FidelityResult(ok, k, config.mask.block_q, 1 - k / 8, 1.0, 0.0,
                              0.0, (1, 2), (1, 2) if ok else (1, 3), 256, 4)

    monkeypatch.setattr(fidelity, "check", fake_check)


def test_search_finds_the_threshold_of_a_monotone_criterion(monkeypatch):
    for threshold in range(3, 9):
        _fake_runs(monkeypatch, lambda k, t=threshold: k >= t)
        found = search_k(None, torch.arange(256), TraceConfig.of(block_size=32), k_min=3, k_max=8)
        probed = [p["top_k"] for p in found.probes]
        assert found.top_k == threshold, (threshold, probed)
        assert len(probed) == len(set(probed)) <= 4 and all(3 <= k <= 8 for k in probed)


def test_search_reports_k_max_failing(monkeypatch):
    _fake_runs(monkeypatch, lambda k: False)
    with pytest.raises(ValueError, match=r"largest k tried, k_max=6, fails .* raise --k-max"):
        search_k(None, torch.arange(256), TraceConfig.of(block_size=32), k_min=3, k_max=6)


def test_search_on_a_non_monotone_criterion_returns_a_passing_k(monkeypatch):
    """k = 4 passes, 5 and 6 fail, 7+ pass: binary search may miss 4, but what it returns passed."""
    _fake_runs(monkeypatch, lambda k: k == 4 or k >= 7)
    found = search_k(None, torch.arange(256), TraceConfig.of(block_size=32), k_min=3, k_max=8)
    assert found.result.criterion_passed and found.top_k in (4, 7)
    assert {p["top_k"]: p["criterion_passed"] for p in found.probes}[found.top_k]


# --------------------------------------------------------------------------- CLI errors

@pytest.mark.parametrize("argv, message", [
    (["--search-k", "--k-min", "6", "--k-max", "4"], "--k-min 6 exceeds --k-max 4"),
    (["--top-k", "4", "--k-max", "6"], "--k-min and --k-max bound --search-k"),
])
def test_cli_bad_bounds_exit_2_with_one_sentence(essay_file, capsys, argv, message):
    rc = main(["fidelity", "--text-file", str(essay_file), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.slow
def test_cli_short_input_and_failing_k_max_exit_2(tmp_path, capsys, monkeypatch):
    short = tmp_path / "short.txt"
    short.write_text("Hello there, world.", encoding="utf-8")
    rc = main(["fidelity", "--text-file", str(short), "--top-k", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "fewer than one block of 32" in err and err.count("\n") == 1

    long = tmp_path / "long.txt"
    long.write_text(haystack_text(2000), encoding="utf-8")
    _fake_runs(monkeypatch, lambda k: False)
    rc = main(["fidelity", "--text-file", str(long), "--max-tokens", "128", "--search-k",
               "--k-max", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "raise --k-max" in err and err.count("\n") == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- Gemma 3 anchor

@pytest.mark.slow
def test_gemma_every_block_kept_equals_sdpa_logits():
    """Gemma 3 270M (sliding window 512 on 5 of every 6 layers) over 1100 tokens: with every block
    kept, traced logits equal sdpa's up to float32 rounding (bound: 1.5 x how far sdpa's own float32
    logits land from float64, at least 1e-4) and, in float64, to 1e-9. The float32 run is chunked
    (1024 + 76 tokens); the float64 one is a single forward of the sparse model."""
    keep = 256  # positions 844..1099: every one sees past the 512-token window
    model, tokenizer = load_model("gemma-3-270m")
    ids, _ = tokenize(tokenizer, haystack_text(8000), max_tokens=1099)
    ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
    config = TraceConfig.of(block_size=32, top_k=-(-ids.shape[0] // 32), chunk_size=1024)
    got = {}
    with torch.no_grad():
        got["sdpa", torch.float32] = model(ids[None], logits_to_keep=keep).logits[0].double()
        trace, ours = trace_ids(model, ids, config, keep_logits=keep)
        got["ours", torch.float32] = ours.double()
        full = [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]
        for layer in full:  # global layers keep every causal block
            indices = trace.layer(layer)[0]
            assert int((indices >= 0).sum()) == 4 * sum(min(i + 1, 35) for i in range(35))
        model.double()  # chunked_forward hands back float32, so run float64 in one piece
        got["sdpa", torch.float64] = model(ids[None], logits_to_keep=keep).logits[0]
        with sparse_model(model, config, record=False):
            got["ours", torch.float64] = model(ids[None], logits_to_keep=keep).logits[0]
    f32, f64 = torch.float32, torch.float64
    ours32 = (got["ours", f32] - got["sdpa", f32]).abs().max().item()
    sdpa_err = (got["sdpa", f32] - got["sdpa", f64]).abs().max().item()
    ours_err = (got["ours", f32] - got["sdpa", f64]).abs().max().item()
    ours64 = (got["ours", f64] - got["sdpa", f64]).abs().max().item()
    print(f"|ours32 - sdpa32| {ours32:.2e}, |sdpa32 - sdpa64| {sdpa_err:.2e}, "
          f"|ours32 - sdpa64| {ours_err:.2e}, |ours64 - sdpa64| {ours64:.2e}")
    assert ours32 <= max(1e-4, 1.5 * sdpa_err)
    assert ours64 <= 1e-9
