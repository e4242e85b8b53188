"""The tracer on real weights: registered attention, chunked prefill, the correctness anchor, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from sparsetrace import Trace
from sparsetrace.config import TraceConfig
from sparsetrace.datasets.essays import haystack_text
from sparsetrace.tracing.backend import ATTN_NAME, sparse_model, stream_attention_forward
from sparsetrace.tracing.forward import chunked_forward
from sparsetrace.tracing.tracer import tokenize, trace_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def essay_ids(smollm):
    _, tokenizer = smollm
    ids, _ = tokenize(tokenizer, haystack_text(6000), max_tokens=700)
    assert ids.shape[0] == 700
    return ids


def test_all_blocks_kept_equals_sdpa_logits(smollm, essay_ids):
    """The guard against the silent trap: a custom backend gets no mask from transformers, so causality
    must come from our attention. With every block kept, traced logits equal sdpa's for any chunking."""
    model, _ = smollm
    T = essay_ids.shape[0]
    with torch.no_grad():
        dense = model(essay_ids[None]).logits[0].float()
    for chunk in (64, 256, 1024):
        config = TraceConfig.of(block_size=32, top_k=T // 32 + 1, chunk_size=chunk)
        trace, logits = trace_ids(model, essay_ids, config, keep_logits=T)
        diff = (logits - dense).abs().max().item()
        print(f"chunk {chunk}: max |sparse - sdpa| = {diff:.2e}, sparsity {trace.sparsity:.3f}")
        assert trace.sparsity == 0.0
        assert diff < 1e-4


def test_trace_does_not_depend_on_chunk_size(smollm, essay_ids):
    model, _ = smollm
    ids = essay_ids[:400]
    traces = [trace_ids(model, ids, TraceConfig.of(block_size=16, top_k=5, chunk_size=c)) for c in (48, 160, 400)]
    first = traces[0]
    assert first.sparsity > 0.5  # a real selection, not everything kept
    for other in traces[1:]:
        for layer in range(first.num_layers):
            i0, m0 = first.layer(layer)
            i1, m1 = other.layer(layer)
            assert torch.equal(i0, i1), f"layer {layer}: indices differ between chunk sizes"
            assert (m0 - m1).abs().max().item() < 1e-3  # float16 storage of masses


def test_more_kept_blocks_track_dense_more_closely(smollm, essay_ids):
    """Sanity of the whole path: keeping 8 blocks per query block (60% of pairs pruned) keeps the next-token
    distribution much closer to dense than keeping only the 3 forced/minimal ones."""
    model, _ = smollm
    dense = chunked_forward(model, essay_ids, 256, keep_logits=64)
    results = {}
    for k in (3, 8):
        config = TraceConfig.of(block_size=16, top_k=k, chunk_size=256)
        trace, sparse = trace_ids(model, essay_ids, config, keep_logits=64)
        kl = torch.nn.functional.kl_div(sparse.log_softmax(-1), dense.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1).mean().item()
        agree = (sparse.argmax(-1) == dense.argmax(-1)).float().mean().item()
        results[k] = (trace.sparsity, kl, agree)
        print(f"k={k}: sparsity {trace.sparsity:.3f} mean KL {kl:.4f} top-1 agreement {agree:.3f}")
    assert results[8][0] > 0.5
    assert results[8][1] < 0.5 * results[3][1]
    assert results[8][2] > results[3][2] and results[8][2] > 0.7


def test_registration_is_scoped(smollm, essay_ids):
    model, _ = smollm
    before = model.config._attn_implementation
    forward = type(model.model.layers[0].self_attn).forward
    with pytest.raises(RuntimeError, match="inside the block"):
        with sparse_model(model, TraceConfig()):
            assert model.config._attn_implementation == ATTN_NAME
            raise RuntimeError("an error inside the block")
    assert model.config._attn_implementation == before
    assert type(model.model.layers[0].self_attn).forward is forward  # nothing patched
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="sparse_model"):
        stream_attention_forward(model.model.layers[0].self_attn, q, q, q, None)


def test_past_context_window_warns(smollm, essay_ids):
    model, _ = smollm
    saved = model.config.max_position_embeddings
    model.config.max_position_embeddings = 64
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trace_ids(model, essay_ids[:96], TraceConfig.of(top_k=4, chunk_size=96))
    finally:
        model.config.max_position_embeddings = saved
    assert any("context window of 64" in str(w.message) for w in caught)


def test_killed_trace_resumes_to_the_same_result(tmp_path, smollm):
    """Kill `sparsetrace trace` mid-run (SIGKILL), rerun the same command: the result equals an
    uninterrupted trace and the finished shards were not rewritten."""
    model, tokenizer = smollm
    text_file = tmp_path / "essay.txt"
    text_file.write_text(haystack_text(5000))
    out = tmp_path / "trace"
    cmd = [sys.executable, "-m", "sparsetrace.cli", "trace", "--text-file", str(text_file),
           "--max-tokens", "1024", "--top-k", "6", "--chunk-size", "64", "--no-progress",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    shards = []
    while time.time() < deadline and proc.poll() is None:
        manifest = out / "manifest.json"
        if manifest.exists():
            try:
                shards = json.loads(manifest.read_text())["shards"]
            except (json.JSONDecodeError, KeyError):
                shards = []
            if len(shards) >= 3:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the trace finished before it could be killed; lower the chunk size"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(ValueError, match="(?i)incomplete|interrupted"):
        Trace.load(out)
    first_shard = out / shards[0]["file"]
    stamp = first_shard.stat().st_mtime_ns
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout
    assert first_shard.stat().st_mtime_ns == stamp
    resumed = Trace.load(out)
    ids, offsets = tokenize(tokenizer, text_file.read_text(), max_tokens=1024)
    reference = trace_ids(model, ids, TraceConfig.of(top_k=6, chunk_size=64))
    assert torch.equal(resumed.tokens, ids)
    assert torch.equal(resumed.token_offsets, offsets)
    for layer in range(reference.num_layers):
        assert torch.equal(resumed.layer(layer)[0], reference.layer(layer)[0])
        assert (resumed.layer(layer)[1] - reference.layer(layer)[1]).abs().max() < 1e-3


GPU_TRACE = os.path.join(os.path.dirname(__file__), "data", "smollm2-300-gpu")


def test_a_trace_from_the_gpu_path_matches_the_cpu_path(smollm):
    """tests/data/smollm2-300-gpu was written by `sparsetrace trace --device cuda` on an H200 (FlexAttention
    and the Triton scorer; tests/data/README.md). It reads back with its checksums, and the CPU path on the
    same text and settings keeps the same blocks with the same masses (float32 rounding apart)."""
    from sparsetrace.tracing.tracer import trace_text

    gpu = Trace.load(GPU_TRACE)
    assert gpu.meta["device"].startswith("cuda")
    model, tokenizer = smollm
    cpu = trace_text(model, tokenizer, gpu.text, gpu.trace_config, max_tokens=300)
    assert cpu.meta["device"] == "cpu"
    assert torch.equal(cpu.tokens, gpu.tokens) and torch.equal(cpu.token_offsets, gpu.token_offsets)
    rows = same = 0
    for layer in range(gpu.num_layers):
        (gi, gm), (ci, cm) = gpu.layer(layer), cpu.layer(layer)
        equal = (gi == ci).all(-1)
        rows, same = rows + equal.numel(), same + int(equal.sum())
        assert (gm.float() - cm.float())[equal].abs().max() < 2e-3, layer  # float16 storage: ~5e-4
    print(f"GPU vs CPU: {same}/{rows} rows keep the same blocks")
    assert same >= 0.99 * rows  # measured: all 5130 (and 69114 of 69120 at 8k tokens)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cli_device_cuda_without_a_gpu_is_one_sentence_and_writes_nothing(tmp_path, capsys):
    from sparsetrace.cli import main

    text = tmp_path / "essay.txt"
    text.write_text(haystack_text(2000), encoding="utf-8")
    rc = main(["trace", "--device", "cuda", "--text-file", str(text), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 2 and "PyTorch sees no CUDA GPU here" in err and "--device cpu" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "t").exists()
