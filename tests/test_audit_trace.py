"""Every trace audits itself, on real weights: the audited missed mass equals a float64 dense computation
over the same queries and keys, the audited recall is the oracle's row read by sets, the per-row estimate
covers the exact value on most audited rows, and all of it survives the store and the chunk size."""

from __future__ import annotations

import math

import pytest
import torch

import sparsetrace as sp
from sparsetrace.config import TraceConfig
from sparsetrace.datasets.essays import haystack_text
from sparsetrace.tracing.backend import sparse_model
from sparsetrace.tracing.forward import chunked_forward
from sparsetrace.tracing.tracer import tokenize, trace_ids

pytestmark = pytest.mark.slow


def observed_run(model, ids, config):
    """The trace of ``ids`` and, per layer, the post-RoPE q of every chunk (joined) and the last chunk's
    keys (every key), as the sparse run saw them."""
    seen: dict[int, dict] = {}

    def observe(layer, query, key, mask, scale, window):
        entry = seen.setdefault(layer, {"q": [], "scale": scale, "window": window})
        entry["q"].append(query[0].double().cpu())
        entry["k"] = key[0].double().cpu()

    chunks = []
    with sparse_model(model, config, num_tokens=ids.shape[0], observe=observe) as session:
        chunked_forward(model, ids, config.chunk_size, on_chunk=lambda a, b: chunks.append(session.take_chunk()))
    from sparsetrace.tracing.tracer import join_chunks

    trace = sp.Trace.from_arrays(**join_chunks(chunks), block_q=config.mask.block_q, block_k=config.mask.block_k,
                                 tokens=ids)
    return trace, {layer: (torch.cat(e["q"], dim=1), e["k"], e["scale"], e["window"]) for layer, e in seen.items()}


def dense_missed(q, k, row, indices_row, block_q, block_k, scale, window):
    """float64 missed mass of one query block: 1 - sum over kept allowed keys of the full softmax, averaged."""
    Hq, T, _ = q.shape
    Hkv, S, _ = k.shape
    kk = k.repeat_interleave(Hq // Hkv, dim=0)
    t0, t1 = row * block_q, min((row + 1) * block_q, T)
    logits = q[:, t0:t1] @ kk.transpose(-1, -2) * scale  # [H, n, S]
    pos_q = torch.arange(t0, t1)[:, None] + (S - T)
    pos_k = torch.arange(S)[None, :]
    allowed = pos_k <= pos_q
    if window is not None:
        allowed = allowed & (pos_k > pos_q - window)
    p = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)
    out = []
    for h in range(Hq):
        kept = torch.zeros(S, dtype=torch.bool)
        for j in indices_row[h].tolist():
            if j >= 0:
                kept[j * block_k:(j + 1) * block_k] = True
        out.append(1 - p[h][:, kept].sum(-1).mean())
    return torch.stack(out)


@pytest.mark.parametrize("model_name", ["smollm2-135m", "gemma-3-270m"])
def test_audit_equals_float64_dense_and_the_oracle_on_real_weights(model_name, smollm):
    model, tokenizer = smollm if model_name == "smollm2-135m" else sp.load_model(model_name)
    ids, _ = tokenize(tokenizer, haystack_text(12000), max_tokens=640 if model_name == "smollm2-135m" else 1100)
    config = TraceConfig.of(block_size=16, top_k=6, chunk_size=256, audit_rate=8, missed_samples=64)
    trace, inputs = observed_run(model, ids, config)
    audit = trace.audit()
    rows = audit["query_block"]
    assert len(rows) == 8 and rows.unique().numel() == 8
    worst_missed, recall_checked = 0.0, 0
    for layer, (q, k, scale, window) in inputs.items():
        indices = trace.layer(layer)[0]  # [H, nQ, top_k]
        oracle = sp.oracle_mask(q[None].float(), k[None].float(), config.mask, window=window, scale=scale).indices[0]
        for col, row in enumerate(rows.tolist()):
            want = dense_missed(q, k, row, indices[:, row], 16, 16, scale, window)
            got = audit["missed"][layer, :, col]
            worst_missed = max(worst_missed, (got.double() - want).abs().max().item())
            for h in range(q.shape[0]):  # recall: the oracle's searched blocks the row kept, by sets
                first, T = row * 16, q.shape[1]
                n = (min(first + 16, T) - 1) // 16 + 1
                lo = 0 if window is None else max(0, (first - window + 1) // 16)
                forced = set(range(lo, lo + (config.mask.sink_blocks if window is None else 0)))
                forced |= set(range(n - config.mask.local_blocks, n))
                picks = {j for j in oracle[h, row].tolist() if j >= 0} - forced
                r = audit["recall"][layer, h, col].item()
                if n - lo <= config.mask.top_k or not picks:
                    assert math.isnan(r)
                    continue
                kept = {j for j in indices[h, row].tolist() if j >= 0}
                assert r == pytest.approx(len(kept & picks) / len(picks)), (layer, h, row)
                recall_checked += 1
    print(f"{model_name}: max |audit - float64 dense| {worst_missed:.2e}, {recall_checked} recalls checked")
    assert worst_missed < 1e-3 and recall_checked > 100
    # The per-row estimate holds the exact value on most audited rows (bench/audit_calibration.py
    # measures it at 4k tokens for every k).
    estimate = torch.stack([torch.stack([trace.missed(layer, h) for h in range(trace.num_heads)])
                            for layer in range(trace.num_layers)])[:, :, rows]  # [L, H, r, 3]
    exact = audit["missed"]
    cover = ((estimate[..., 1] <= exact + 1e-5) & (exact <= estimate[..., 2] + 1e-5)).float().mean().item()
    print(f"{model_name}: interval coverage {cover:.3f}, median |error| "
          f"{(estimate[..., 0] - exact).abs().median().item():.4f}")
    assert cover >= 0.85


def test_audit_and_estimate_do_not_depend_on_the_chunk_size_and_reach_the_store(smollm, tmp_path):
    model, tokenizer = smollm
    ids, offsets = tokenize(tokenizer, haystack_text(6000), max_tokens=400)
    traces = [trace_ids(model, ids, TraceConfig.of(block_size=16, top_k=5, chunk_size=c, audit_rate=6))
              for c in (48, 400)]
    on_disk = trace_ids(model, ids, TraceConfig.of(block_size=16, top_k=5, chunk_size=160, audit_rate=6),
                        out=tmp_path / "t")
    for other in (traces[1], sp.Trace.load(tmp_path / "t")):
        a, b = traces[0].audit(), other.audit()
        assert torch.equal(a["query_block"], b["query_block"])
        assert (a["missed"] - b["missed"]).abs().max() < 1e-4
        assert torch.allclose(a["recall"], b["recall"], equal_nan=True)
        for layer in (0, 13, 29):
            assert (traces[0].missed(layer, 4) - other.missed(layer, 4)).abs().max() < 2e-3  # float16 on disk
    assert on_disk.has_missed and len(on_disk.manifest["shards"]) == 3
    off = trace_ids(model, ids, TraceConfig.of(block_size=16, top_k=5, chunk_size=400, audit_rate=0,
                                               missed_samples=0))
    assert off.audit() is None and off.missed(0, 0) is None
    assert torch.equal(off.layer(7)[0], traces[1].layer(7)[0])  # the audit never changes the selection
