"""sparse_attention against float64 dense references built here from scratch, plain torch's error in
low precision, full causal SDPA when every block is kept, per-block masses, and the O(T * S) memory
claim."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_close,
    block_mass_f64,
    dense_attention_f64,
    loop_token_mask,
    make_qkv,
    mask_cases,
    mask_kwargs,
)
from hypothesis import given, settings
from hypothesis import strategies as hs

import sparsetrace as sp
from sparsetrace.selection.blocks import BlockMask


def _with_sink(case):
    """At least one sink block: key 0 is then visible to every query, so no softmax row is empty.

    (With no sink and block_q > block_k, a block's early queries can see none of the kept keys; both
    the implementation and a dense reference then return NaN for them.)"""
    sink = max(1, case["sink"])
    return dict(case, sink=sink, top_k=max(case["top_k"], sink + case["local"] + 1))


def _problem(case, dtype=torch.float32, fn=sp.stream_mask):
    q, k, v = make_qkv(case, dtype, v=True)
    mask = fn(q, k, **mask_kwargs(case))
    token_mask = loop_token_mask(
        mask.indices, case["block_q"], case["block_k"], case["T"], case["S"]
    )
    return q, k, v, mask, token_mask


def _expand_kv(x, Hq):
    return x.repeat_interleave(Hq // x.shape[1], dim=1)


@settings(max_examples=30)
@given(case=mask_cases(max_T=100, max_extra=40).map(_with_sink), oracle=hs.booleans())
def test_float32_matches_float64_loop_reference(case, oracle):
    """impl="torch" in float32 within 1e-5 (relative to the largest output) of float64 attention
    under a token mask rebuilt by loops from the indices; impl="reference" on float64 inputs within
    1e-12."""
    q, k, v, mask, token_mask = _problem(case, fn=sp.oracle_mask if oracle else sp.stream_mask)
    want, _ = dense_attention_f64(q, k, v, token_mask)
    got = sp.sparse_attention(q, k, v, mask, impl="torch")
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert_close(f"torch float32 {case}", got, want, rtol=1e-5)
    got = sp.sparse_attention(q.double(), k.double(), v.double(), mask, impl="reference")
    assert_close(f"reference float64 {case}", got, want, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@settings(max_examples=12)
@given(case=mask_cases(max_T=100, max_extra=40).map(_with_sink))
def test_low_precision_within_plain_torch_error(case, dtype):
    """bf16/fp16 inputs: the error against float64 (on the same rounded inputs) is at most twice
    that of F.scaled_dot_product_attention run in the same dtype on the same masked problem."""
    q, k, v, mask, token_mask = _problem(case, dtype)
    want, _ = dense_attention_f64(q, k, v, token_mask)
    Hq = q.shape[1]
    sdpa = F.scaled_dot_product_attention(
        q, _expand_kv(k, Hq), _expand_kv(v, Hq), attn_mask=token_mask
    )
    torch_err = (sdpa.double() - want).abs().max().item()
    got = sp.sparse_attention(q, k, v, mask, impl="torch")
    assert got.dtype == dtype
    err = assert_close(f"{dtype} vs float64", got, want, atol=2 * torch_err + 1e-7)
    assert err <= 2 * torch_err + 1e-7, (
        f"{dtype}: error {err:.3e} > 2 x plain torch error {torch_err:.3e}"
    )


@settings(max_examples=20)
@given(case=mask_cases(max_T=120, max_extra=40), extra=hs.integers(0, 2))
def test_every_block_kept_equals_causal_sdpa(case, extra):
    """top_k covering every key block: the result is full causal attention (diagonal offset S - T),
    i.e. float64 F.scaled_dot_product_attention with an explicit causal mask and GQA heads expanded.
    """
    n_kb = math.ceil(case["S"] / case["block_k"])
    case = dict(case, top_k=max(n_kb, case["sink"] + case["local"] + 1) + extra)
    q, k, v = make_qkv(case, v=True)
    mask = sp.stream_mask(q, k, **mask_kwargs(case))
    T, S, Hq = case["T"], case["S"], q.shape[1]
    causal = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    want = F.scaled_dot_product_attention(
        q.double(), _expand_kv(k, Hq).double(), _expand_kv(v, Hq).double(), attn_mask=causal
    )
    assert_close(
        f"torch float32 vs causal sdpa {case}", sp.sparse_attention(q, k, v, mask), want, rtol=1e-5
    )
    got = sp.sparse_attention(q.double(), k.double(), v.double(), mask, impl="reference")
    assert_close(f"reference vs causal sdpa {case}", got, want, rtol=1e-12)


@settings(max_examples=25)
@given(case=mask_cases(max_T=100, max_extra=40).map(_with_sink), oracle=hs.booleans())
def test_mass(case, oracle):
    """return_mass: per kept block, the float64 softmax probability summed over the block's keys and
    averaged over the query block's real queries (rebuilt here with loops); rows sum to 1; 0 at -1.
    """
    q, k, v, mask, token_mask = _problem(case, fn=sp.oracle_mask if oracle else sp.stream_mask)
    want_out, probs = dense_attention_f64(q, k, v, token_mask)
    want = block_mass_f64(probs, mask.indices, case["block_q"], case["block_k"])
    for impl in ("torch", "reference"):
        out, mass = sp.sparse_attention(q, k, v, mask, return_mass=True, impl=impl)
        assert mass.dtype == torch.float32 and mass.shape == mask.indices.shape, (
            mass.dtype,
            mass.shape,
        )
        assert_close(f"{impl} out with return_mass", out, want_out, rtol=1e-5)
        assert_close(f"{impl} mass {case}", mass, want, atol=1e-5)
        assert_close(
            f"{impl} mass row sums", mass.double().sum(-1), torch.ones(mass.shape[:-1]), atol=1e-5
        )
        padded = mass[mask.indices < 0]
        assert (padded == 0).all(), f"{impl}: mass at -1 entries {padded[padded != 0].tolist()}"


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, torch
    import sparsetrace as sp
    from sparsetrace.attention.blockwise import sparse_attention_torch

    def status_mib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

    def growth(fn):
        # Peak RSS growth of one call: reset the high-water mark (Linux >= 4.0), run, read it back.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status_mib("VmRSS")
        result = fn()
        return result, status_mib("VmHWM") - before

    torch.set_num_threads(2)
    T = 16384
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, 16, generator=g) for _ in range(3))
    kw = dict(block_q=32, block_k=32, top_k=4, sink_blocks=1, local_blocks=1)
    small = sp.stream_mask(q[:, :, :64], k[:, :, :64], **kw)  # warm up kernels and the allocator
    sparse_attention_torch(q[:, :, :64], k[:, :, :64], v[:, :, :64], small)
    mask, mask_mib = growth(lambda: sp.stream_mask(q, k, **kw))
    out, attention_mib = growth(lambda: sparse_attention_torch(q, k, v, mask, return_mass=True))
    _, control_mib = growth(lambda: torch.ones(T, T // 4))  # 256 MiB: the probe must see it
    print(json.dumps(dict(mask=mask_mib, attention=attention_mib, control=control_mib,
                          finite=bool(out[0].isfinite().all()))))
    """
)


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak reset"
)
def test_memory_stays_below_dense():
    """T = S = 16384 (a float32 [T, S] is 1 GiB): stream_mask and sparse_attention_torch each raise
    peak RSS by far less than a [T, S] tensor. Fresh subprocess; the peak (VmHWM) is reset before
    each call, and a 256 MiB control allocation checks that the probe does see real allocations."""
    run = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    growth = json.loads(run.stdout.strip().splitlines()[-1])
    print(growth)
    assert growth["finite"], growth
    assert 240 < growth["control"] < 300, f"probe cannot see a 256 MiB allocation: {growth}"
    assert growth["mask"] < 128 and growth["attention"] < 128, (
        f"peak RSS growth (MiB) {growth}, [T, S] = 1024"
    )


def test_bad_input():
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    mask = sp.stream_mask(q, k, block_q=4, block_k=4, top_k=3)
    with pytest.raises(ValueError, match=r"impl='fast' is not one of"):
        sp.sparse_attention(q, k, v, mask, impl="fast")
    with pytest.raises(ValueError, match=r"k and v \[B, Hkv, S, D\]"):
        sp.sparse_attention(q, k, v[:, :, :11], mask)
    with pytest.raises(ValueError, match=r"need q \[B, Hq, T, D\]"):
        sp.sparse_attention(q[0], k, v, mask)
    with pytest.raises(ValueError, match=r"do not fit q .*build the mask from these q and k"):
        sp.sparse_attention(q[:, :, :4], k, v, mask)
    with pytest.raises(ValueError, match=r"4 query heads are not a multiple of 3 kv heads"):
        sp.sparse_attention(q, torch.randn(1, 3, 12, 8), torch.randn(1, 3, 12, 8), mask)
    short = BlockMask(torch.zeros(1, 4, 3, 3, dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match=r"got T=10 > S=8"):
        sp.sparse_attention(q, k[:, :, :8], v[:, :, :8], short)


def test_query_without_visible_key_gets_zeros_not_nan():
    """With no sink and a local window narrower than the query block, the first queries of a block can see
    no kept key; they get zero output and zero mass instead of NaN, in both implementations."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    k[:, :, 40:] *= 10
    mask = sp.stream_mask(q, k, block_q=32, block_k=4, top_k=4, sink_blocks=0, local_blocks=1)
    out, mass = sp.sparse_attention(q, k, v, mask, return_mass=True)
    ref, ref_mass = sp.sparse_attention(q, k, v, mask, return_mass=True, impl="reference")
    assert not out.isnan().any() and not mass.isnan().any()
    blind = ~mask.to_dense(64, 64).any(-1)[0, 0]  # queries that see nothing
    assert blind.any(), "the case no longer exercises a blind query"
    assert torch.equal(out[0, 0, blind], torch.zeros_like(out[0, 0, blind]))
    assert (out - ref).abs().max() < 1e-5 and (mass - ref_mass).abs().max() < 1e-6


def test_sliding_window_attention_matches_reference():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 150, 16), torch.randn(1, 2, 170, 16), torch.randn(1, 2, 170, 16)
    mask = sp.stream_mask(q, k, block_q=16, block_k=8, top_k=6, window=40)
    out, mass = sp.sparse_attention(q, k, v, mask, return_mass=True, window=40)
    ref, ref_mass = sp.sparse_attention(q, k, v, mask, return_mass=True, window=40, impl="reference")
    assert (out - ref).abs().max() < 1e-5 and (mass - ref_mass).abs().max() < 1e-6
    assert (mass.sum(-1) - 1).abs().max() < 1e-5
