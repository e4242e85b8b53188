"""Check the GPU paths against the CPU references on random inputs; print a table, exit 1 on failure.

Run on a CUDA machine from the repository root (docs/gpu.md):

    PYTHONPATH=src python bench/gpu_check.py

What is compared, per case (ragged T and S, q_offset = S - T > 0, GQA, batch 2, windows, strides, scores):
- indices: ``stream_mask(impl="triton")`` (the Triton scorer) against ``stream_mask`` on the CPU, on float32
  and on bf16 inputs (the CPU scores the same bf16 values in float32). Rows may differ only where the search
  meets a near tie: a float64 rerun of the search flags rows whose m-th and (m+1)-th best half at some level
  are within ``TIE_RTOL`` of each other; a differing row that is not flagged fails the check.
- attention: ``sparse_attention(impl="triton")`` (FlexAttention) against ``attention.dense.sparse_attention_reference``
  in float64, relative Frobenius error; passes if at most twice the error of plain torch in the input dtype
  (dense masked softmax attention with every op in that dtype) or under a floor.
- masses: the same call's ``mass`` against the float64 reference (max abs error, the same rule), rows sum
  to 1, and the Triton ``block_mass`` against ``block_mass_torch`` fed the same logsumexp.
- SHORTLIST indices: ``shortlist_mask(impl="triton")`` (torch pre-score on the GPU, Triton rescoring) against
  its plain-loop float64 reference (``impl="reference"``), float32 and bf16 inputs; rows may differ only
  where the float64 pre-scores tie at the shortlist's cut or the exact scores at the m-th pick
  (:func:`shortlist_tie_rows`). ``--shortlist-only`` runs this part alone.
- audit: ``audit_rows`` with the fused Triton scan (``ops.audit_scanner``) against the torch scan in float64 on
  the CPU, a few query blocks per case: missed mass within ``AUDIT_TOL`` and the oracle rows equal, except
  where the float64 block scores tie at the m-th pick. ``--audit-only`` runs this part alone (``--cpu``: the
  check's own dry run, torch scan against float64).
- block draw: the per-row estimate's first stage with the fused Triton pass (``ops.estimate_pieces``) against
  ``draw_blocks_torch`` on the CPU, random pre-scores and kept rows: counts and first unkept blocks equal,
  drawn blocks equal except where a point lies within ``DRAW_TIE`` of a CDF step, probabilities within
  ``DRAW_RTOL``; the fused sample step (``ops.estimate_pieces``) against ``sample_rows_torch`` in float64 on
  random draws (GQA, windows, per query and per row), within ``SAMPLE_TOL``; and ``estimate_missed`` (block
  proposal) with both fused steps against torch in float64 on the CPU. ``--draw-only`` runs this part alone.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from sparsetrace import BlockMask, MaskConfig, shortlist_mask, sparse_attention, stream_mask
from sparsetrace.attention.dense import sparse_attention_reference
from sparsetrace.audit.estimate import (
    _mixture,
    _strata,
    draw_blocks_torch,
    estimate_missed,
    keys_in_blocks_torch,
    sample_rows_torch,
)
from sparsetrace.audit.exact import audit_rows
from sparsetrace.ops import audit_scanner, estimate_pieces
from sparsetrace.selection.blocks import (
    candidate_range,
    forced_sinks,
    gather_blocks,
    in_middle,
    kept_blocks,
    query_blocks,
)
from sparsetrace.selection.oracle import block_scores
from sparsetrace.selection.shortlist import Z, pre_scores, shortlist_sizes
from sparsetrace.selection.stream import halves, split_into_groups

TIE_RTOL = 1e-4  # float32 scores of D <= 256 products differ by ~1e-6 relative; a margin under this is a tie
ATT_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3}  # relative Frobenius error always accepted
MASS_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3}  # max abs mass error always accepted
ROWSUM_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3}
AUDIT_TOL = 1e-4  # missed mass: float32 logits of the same (bf16-exact) inputs against float64

# (name, B, Hq, Hkv, T, S, D, block_q, block_k, top_k, sink, local, score, query_stride, window)
CASES = [
    ("square", 1, 4, 2, 1000, 1000, 64, 32, 32, 8, 1, 1, "max", 1, None),
    ("ragged+offset,B2", 2, 6, 2, 333, 1237, 64, 64, 64, 6, 1, 1, "max", 1, None),
    ("lse,bq!=bk,MQA,B2", 2, 4, 1, 777, 777, 128, 64, 32, 10, 2, 2, "lse", 1, None),
    ("stride4,small blocks", 1, 3, 3, 500, 900, 64, 16, 16, 12, 1, 1, "max", 4, None),
    ("window 300", 1, 4, 2, 1200, 1500, 64, 32, 32, 8, 1, 1, "max", 1, 300),
    ("bq128,bk64", 1, 2, 1, 2000, 2011, 128, 128, 64, 12, 1, 2, "max", 1, None),
    ("bench shape 4k", 1, 12, 2, 4096, 4096, 128, 64, 64, 16, 1, 1, "max", 1, None),
]


def _float64_contract(q, k, config: MaskConfig, window):
    """q, k in float64 on the CPU, the forced sinks, m and the candidate ranges ``[lo, n)`` of every row."""
    sinks = forced_sinks(config, window)
    lo, n = candidate_range(q.shape[2], k.shape[2], config, "cpu", window)
    return q.double().cpu(), k.double().cpu(), sinks, config.top_k - sinks - config.local_blocks, lo, n


def tie_rows(q, k, config: MaskConfig, window, scale) -> torch.Tensor:
    """Rows ``[B, Hq, nQ]`` where the float64 search meets a near tie at some level (CPU, float64)."""
    from sparsetrace.kernels.scoring import score_halves_torch

    q, k, sinks, m, lo, n = _float64_contract(q, k, config, window)
    B, Hq, T, _ = q.shape
    S = k.shape[2]
    n_kb = math.ceil(S / config.block_k)
    count = torch.clamp(n - lo - sinks - config.local_blocks, min=m)
    starts, ends = split_into_groups(lo + sinks, count, m)
    starts, ends = starts.expand(B, Hq, -1, -1), ends.expand(B, Hq, -1, -1)
    flagged = torch.zeros(B, Hq, starts.shape[2], dtype=torch.bool)
    for _ in range(math.ceil(math.log2(math.ceil(max(n_kb - sinks - config.local_blocks, m) / m)))):
        hs, he = halves(starts, ends)
        scores = score_halves_torch(q, k, hs, he, config, scale, window).double()
        scores = scores.masked_fill(he <= hs, -math.inf)
        ranked = torch.sort(scores, dim=-1, descending=True, stable=True)
        kth, nxt = ranked.values[..., m - 1], ranked.values[..., m]
        finite = torch.isfinite(nxt)
        flagged |= finite & ((kth - nxt).abs() <= TIE_RTOL * kth.abs().clamp(min=1.0))
        order = torch.sort(ranked.indices[..., :m], dim=-1).values
        starts, ends = hs.gather(-1, order), he.gather(-1, order)
    return flagged & (n - lo > config.top_k)[None, None, :]


def plain_torch_attention(q, k, v, dense, scale):
    """Dense masked attention with every op in q's dtype (the 'plain torch' error of that dtype)."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = (q @ kk.transpose(-1, -2)) * scale
    probs = torch.softmax(logits.masked_fill(~dense, -math.inf), dim=-1)
    return probs @ vv, probs


def plain_torch_mass(probs, mask, T, S):
    B, Hq = probs.shape[:2]
    bq, bk = mask.block_q, mask.block_k
    nQ, n_kb = mask.indices.shape[2], math.ceil(S / bk)
    per = torch.nn.functional.pad(probs, (0, n_kb * bk - S)).view(B, Hq, T, n_kb, bk).sum(-1)
    per = torch.nn.functional.pad(per, (0, 0, 0, nQ * bq - T)).view(B, Hq, nQ, bq, n_kb).sum(3)
    real = torch.clamp(T - torch.arange(nQ, device=probs.device) * bq, max=bq).to(per.dtype)
    per = per / real[:, None]
    ids = mask.indices.long()
    return per.gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, 0.0)


def rel_err(got, want) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def max_err(got, want) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.isfinite(got).all():
        return math.inf
    return (got - want).abs().max().item()


def main() -> int:
    for flag, check in (("--shortlist-only", check_shortlist), ("--audit-only", check_audit),
                        ("--draw-only", check_block_draw)):
        if flag in sys.argv and "--cpu" in sys.argv:  # the check's own dry run, torch path
            failures = check("cpu", torch.Generator().manual_seed(20261202))
            print("FAIL\n  " + "\n  ".join(failures) if failures else "PASS")
            return 1 if failures else 0
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device.")
        return 2
    import triton

    from sparsetrace.kernels import flex

    for key, value in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 512)):
        if hasattr(torch._dynamo.config, key):  # many shapes in one process: never fall back to eager
            setattr(torch._dynamo.config, key, value)
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    gen = torch.Generator().manual_seed(20261128)
    rows, failures = [], []
    shortlist_failures = check_shortlist("cuda", torch.Generator().manual_seed(20261202))
    if "--shortlist-only" in sys.argv:
        print("FAIL\n  " + "\n  ".join(shortlist_failures) if shortlist_failures else "PASS")
        return 1 if shortlist_failures else 0
    failures += shortlist_failures
    draw_failures = check_block_draw("cuda", torch.Generator().manual_seed(20261204))
    if "--draw-only" in sys.argv:
        print("FAIL\n  " + "\n  ".join(draw_failures) if draw_failures else "PASS")
        return 1 if draw_failures else 0
    failures += draw_failures
    audit_failures = check_audit("cuda", torch.Generator().manual_seed(20261203))
    if "--audit-only" in sys.argv:
        print("FAIL\n  " + "\n  ".join(audit_failures) if audit_failures else "PASS")
        return 1 if audit_failures else 0
    failures += audit_failures
    for case in CASES:
        name, B, Hq, Hkv, T, S, D, bq, bk, top_k, sink, local, score, stride, window = case
        config = MaskConfig(block_q=bq, block_k=bk, top_k=top_k, sink_blocks=sink, local_blocks=local,
                            score=score, query_stride=stride)
        scale = D**-0.5
        q32 = torch.randn(B, Hq, T, D, generator=gen)
        k32 = torch.randn(B, Hkv, S, D, generator=gen)
        v32 = torch.randn(B, Hkv, S, D, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            t0 = time.perf_counter()
            q, k, v = q32.to(dtype), k32.to(dtype), v32.to(dtype)
            row = {"case": name, "dtype": str(dtype).replace("torch.", "")}
            # 1. indices
            cpu_mask = stream_mask(q, k, config, window=window)
            gpu_mask = stream_mask(q.cuda(), k.cuda(), config, window=window, impl="triton")
            differ = (gpu_mask.indices.cpu() != cpu_mask.indices).any(-1)  # [B, Hq, nQ]
            ties = tie_rows(q, k, config, window, scale)
            unexplained = differ & ~ties
            row.update(rows=differ.numel(), differ=int(differ.sum()), ties=int(ties.sum()),
                       bad_rows=int(unexplained.sum()))
            if unexplained.any():
                failures.append(f"{name} {dtype}: {int(unexplained.sum())} index rows differ without a tie")
            # 2. attention and masses over the CPU mask
            ref_out, ref_mass = sparse_attention_reference(q, k, v, cpu_mask, return_mass=True,
                                                           window=window)
            dev_mask = BlockMask(cpu_mask.indices.cuda(), bq, bk)
            out, mass = sparse_attention(q.cuda(), k.cuda(), v.cuda(), dev_mask, return_mass=True,
                                         window=window, impl="triton")
            dense = dev_mask.to_dense(T, S, window)
            plain_out, plain_probs = plain_torch_attention(q.cuda(), k.cuda(), v.cuda(), dense, scale)
            plain_mass = plain_torch_mass(plain_probs.float(), dev_mask, T, S)
            att, att_plain = rel_err(out, ref_out), rel_err(plain_out, ref_out)
            mas, mas_plain = max_err(mass, ref_mass), max_err(plain_mass, ref_mass)
            rowsum = (mass.double().sum(-1) - 1).abs().max().item()
            att_tol = max(2 * att_plain, ATT_FLOOR[dtype])
            mass_tol = max(2 * mas_plain, MASS_FLOOR[dtype])
            # 3. Triton block_mass against its torch twin on the same lse (a direct kernel check)
            lse = _reference_lse(q.cuda(), k.cuda(), dense, scale)
            kq, kk = q.cuda(), k.cuda()
            tri = flex.block_mass(kq, kk, lse, dev_mask.indices, bq, bk, scale, window)
            twin = flex.block_mass_torch(kq, kk, lse, dev_mask.indices, bq, bk, scale, window)
            kernel_gap = max_err(tri, twin)
            row.update(att_err=att, att_tol=att_tol, mass_err=mas, mass_tol=mass_tol, rowsum=rowsum,
                       mass_kernel_gap=kernel_gap, seconds=time.perf_counter() - t0)
            if not att <= att_tol:
                failures.append(f"{name} {dtype}: attention error {att:.2e} > {att_tol:.2e}")
            if not mas <= mass_tol:
                failures.append(f"{name} {dtype}: mass error {mas:.2e} > {mass_tol:.2e}")
            if not rowsum <= ROWSUM_TOL[dtype]:
                failures.append(f"{name} {dtype}: mass rows sum to 1 +- {rowsum:.2e}")
            if not kernel_gap <= 1e-4:
                failures.append(f"{name} {dtype}: block_mass vs block_mass_torch {kernel_gap:.2e}")
            rows.append(row)
            print(_fmt(row), flush=True)
    print()
    print(_HEADER)
    for row in rows:
        print(_fmt(row))
    total_differ = sum(r["differ"] for r in rows)
    total_rows = sum(r["rows"] for r in rows)
    print(f"\nindex rows differing: {total_differ} of {total_rows}, all at float64 near-ties: "
          f"{all(r['bad_rows'] == 0 for r in rows)}")
    if failures:
        print("FAIL\n  " + "\n  ".join(failures))
        return 1
    print("PASS")
    return 0


def shortlist_tie_rows(q, k, config: MaskConfig, window, scale) -> torch.Tensor:
    """Rows ``[B, Hq, nQ]`` where SHORTLIST meets a near tie in float64: the C-th and (C+1)-th pre-scores,
    or the m-th and (m+1)-th exact scores inside the shortlist, within ``TIE_RTOL``."""
    q, k, sinks, m, lo, n = _float64_contract(q, k, config, window)
    B, Hq, T, _ = q.shape
    S = k.shape[2]
    j = torch.arange(math.ceil(S / config.block_k))
    middle = in_middle(j[None, :], lo, n, sinks, config)  # [nQ, nKB]
    sizes = shortlist_sizes(middle.sum(-1), m)  # [nQ]
    q_used = query_blocks(q[:1, :1], config, S)[2]
    # step 1 in float64 (the library pools in float32, so it is written out here)
    blocks = torch.nn.functional.pad(k, (0, 0, 0, len(j) * config.block_k - S)).view(
        B, k.shape[1], len(j), config.block_k, -1)
    real = torch.clamp(S - j * config.block_k, max=config.block_k).double()[:, None]
    mean = blocks.sum(3) / real
    var = torch.clamp(blocks.square().sum(3) / real - mean.square(), min=0.0)
    q_sum = (torch.nn.functional.pad(q, (0, 0, 0, q_used.numel() - T)).view(B, Hq, *q_used.shape, -1)
             * q_used[:, :, None]).sum(3)
    pre = pre_scores(q_sum, mean, var, Z).masked_fill(~middle, -math.inf)  # [B, Hq, nQ, nKB]
    exact = block_scores(q, k, config, scale=scale, window=window).double()
    ranked = torch.sort(pre, dim=-1, descending=True, stable=True)
    cut = (sizes.clamp(min=1) - 1)[None, None, :, None].expand(B, Hq, -1, 1)
    at_cut = ranked.values.gather(-1, cut)[..., 0]
    past_cut = ranked.values.gather(-1, (cut + 1).clamp(max=len(j) - 1))[..., 0]
    flagged = torch.isfinite(past_cut) & (sizes < middle.sum(-1)) & (
        (at_cut - past_cut).abs() <= TIE_RTOL * at_cut.abs().clamp(min=1.0))
    in_short = torch.arange(len(j)) < sizes[:, None]  # [nQ, nKB] rank positions inside the shortlist
    short_exact = exact.gather(-1, ranked.indices).masked_fill(~in_short, -math.inf)
    top = torch.sort(short_exact, dim=-1, descending=True).values
    kth, nxt = top[..., m - 1], top[..., m]
    flagged |= torch.isfinite(nxt) & ((kth - nxt).abs() <= TIE_RTOL * kth.abs().clamp(min=1.0))
    return flagged & (n - lo > config.top_k)[None, None, :]


def check_shortlist(device: str, gen: torch.Generator) -> list[str]:
    """SHORTLIST on ``device`` against its float64 loop reference on every case; prints one line per case."""
    failures = []
    for case in CASES:
        name, B, Hq, Hkv, T, S, D, bq, bk, top_k, sink, local, score, stride, window = case
        config = MaskConfig(block_q=bq, block_k=bk, top_k=top_k, sink_blocks=sink, local_blocks=local,
                            score=score, query_stride=stride, estimator="shortlist")
        q32, k32 = torch.randn(B, Hq, T, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            t0 = time.perf_counter()
            q, k = q32.to(dtype), k32.to(dtype)
            impl = "triton" if device.startswith("cuda") else "torch"
            got = shortlist_mask(q.to(device), k.to(device), config, window=window, impl=impl).indices.cpu()
            want = shortlist_mask(q, k, config, window=window, impl="reference").indices
            differ = (got != want).any(-1)
            ties = shortlist_tie_rows(q, k, config, window, D**-0.5)
            bad = int((differ & ~ties).sum())
            print(f"shortlist {name:22s} {str(dtype)[6:]:8s} rows {differ.numel():6d} differ "
                  f"{int(differ.sum()):4d} ties {int(ties.sum()):4d} bad {bad:3d} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
            if bad:
                failures.append(f"shortlist {name} {dtype}: {bad} index rows differ from the loop without a tie")
    return failures


def check_audit(device: str, gen: torch.Generator) -> list[str]:
    """The exact audit on ``device`` (the fused Triton scan on CUDA) against the torch scan in float64 on the
    CPU, five query blocks a case; prints one line per case and dtype."""
    failures = []
    for case in CASES:
        name, B, Hq, Hkv, T, S, D, bq, bk, top_k, sink, local, score, stride, window = case
        config = MaskConfig(block_q=bq, block_k=bk, top_k=top_k, sink_blocks=sink, local_blocks=local,
                            score=score, query_stride=stride)
        q32, k32 = torch.randn(B, Hq, T, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen)
        nQ = math.ceil(T / bq)
        blocks = torch.unique(torch.linspace(0, nQ - 1, 5).round().long())
        for dtype in (torch.float32, torch.bfloat16):
            t0 = time.perf_counter()
            q, k = q32.to(dtype), k32.to(dtype)
            indices = stream_mask(q, k, config, window=window).indices
            want_missed, want_recall, want_oracle = audit_rows(q.double(), k.double(), indices, blocks, config,
                                                               window=window, return_oracle=True)
            qd, kd = q.to(device), k.to(device)
            got_missed, got_recall, got_oracle = audit_rows(
                qd, kd, indices.to(device), blocks.to(device), config, window=window, return_oracle=True,
                scan=audit_scanner(qd, config))
            err = (got_missed.cpu().double() - want_missed.double()).abs().max().item()
            differ = (got_oracle.cpu() != want_oracle).any(-1)  # [B, Hq, r]
            ties = _oracle_tie_rows(q, k, config, window, D**-0.5, blocks)
            bad = int((differ & ~ties).sum())
            print(f"audit     {name:22s} {str(dtype)[6:]:8s} rows {differ.numel():4d} missed err {err:.1e} "
                  f"oracle rows differ {int(differ.sum())} ties {int(ties.sum())} bad {bad} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
            if not err <= AUDIT_TOL:
                failures.append(f"audit {name} {dtype}: missed mass error {err:.2e} > {AUDIT_TOL:.0e}")
            if bad:
                failures.append(f"audit {name} {dtype}: {bad} oracle rows differ without a tie")
    return failures


DRAW_RTOL, DRAW_TIE, SAMPLE_TOL = 1e-5, 1e-6, 1e-5
SAMPLE_CASES = (  # B, Hq, Hkv, T, S, D, block_q, r, draws per unit, exact head keys, window, per query
    (1, 4, 2, 100, 300, 32, 32, 16, 4, 0, None, False), (2, 2, 1, 64, 64, 16, 16, 32, 1, 32, 40, True),
    (1, 12, 2, 700, 5000, 128, 64, 64, 1, 128, None, False), (1, 2, 2, 90, 200, 64, 32, 64, 4, 0, 77, True),
    (1, 4, 1, 300, 3000, 64, 32, 64, 1, 64, None, True))
KEYS_CASES = (  # B, Hq, Hkv, c, key blocks, block_k, D, units, draws per unit, keys cut from the last block, dtype,
    # blocks drawn among the first (None: all; few: many rows draw the same blocks, which the kernel splits)
    (1, 12, 2, 64, 4096, 64, 128, 64, 1, 17, torch.bfloat16, None),
    (1, 12, 2, 64, 4096, 64, 128, 64, 1, 17, torch.float32, None),
    (2, 4, 4, 9, 50, 32, 64, 16, 4, 0, torch.float32, None), (1, 2, 1, 7, 30, 24, 32, 8, 2, 5, torch.float32, None),
    (1, 3, 1, 5, 20, 4, 16, 64, 1, 3, torch.bfloat16, None),
    (2, 12, 2, 32, 4096, 64, 128, 64, 1, 17, torch.bfloat16, 3))
DRAW_CASES = (  # B, H, c, key blocks, kept width, points, census need, exact head
    (1, 12, 64, 16384, 16, 64, 2, 2), (2, 3, 37, 700, 5, 16, 4, 2), (1, 2, 9, 9, 8, 16, 2, 2),
    (1, 4, 33, 2048, 64, 8, 1, 0), (1, 4, 20, 12, 9, 64, 2, 3))


def check_block_draw(device: str, gen: torch.Generator) -> list[str]:
    """The fused block draw (or, with ``--cpu``, the torch one) against ``draw_blocks_torch`` on the CPU."""
    failures = []
    for B, H, c, n_kb, width, m, need, head in DRAW_CASES:
        name = f"{B}x{H}x{c} nKB {n_kb} w {width} head {head}"
        scores = torch.randn(B, H, c, n_kb, generator=gen) * 4
        n = torch.randint(1, n_kb + 1, (c,), generator=gen)
        lo = torch.minimum(torch.randint(0, n_kb, (c,), generator=gen) // 2, n - 1)
        indices = torch.randint(-1, n_kb, (B, H, c, width), generator=gen).int()
        u = _strata(torch.randint(0, 2**40, (B, H, c), generator=gen), m)
        want = draw_blocks_torch(scores.clone(), lo, n, indices, u, 0.5, need, head)
        draw = (estimate_pieces(scores.to(device), 32, 64) or [draw_blocks_torch])[0]
        got = [x.cpu() for x in draw(scores.to(device), lo.to(device), n.to(device), indices.to(device),
                                     u.to(device), 0.5, need, head)]
        # a point within DRAW_TIE of a CDF step may land either side of it in float32 vs float64 exps
        j = torch.arange(n_kb)
        tail = (j >= lo[:, None]) & (j < n[:, None]) & ~kept_blocks(indices, n_kb)
        tail &= ~kept_blocks(want[4], n_kb)
        w = _mixture(scores.clone()[..., None, :], tail[..., None, :], 0.5).flatten(-2).double()
        cdf = w.cumsum(-1) / w.sum(-1, keepdim=True).clamp(min=1e-300)
        near = ((cdf[..., None, :] - u[..., None]).abs() < DRAW_TIE).any(-1)  # [B, H, c, m]
        valid = tail.any(-1)[..., None].expand_as(want[1])  # a row with no tail draws nothing used
        differ = (got[0] != want[0]) & valid
        bad = int((differ & ~near).sum())
        err = ((got[1] / want[1] - 1).abs()[valid & ~differ]).max().item() if valid.any() else 0.0
        same = [torch.equal(got[2], want[2]), torch.equal(got[3], want[3]),
                torch.equal(got[4].sort(-1).values, want[4].sort(-1).values)]
        print(f"draw      {name:33s} points {differ.numel():6d} differ {int(differ.sum())} near {int(near.sum())} "
              f"bad {bad} prob rel err {err:.1e} counts/first/head equal {same}", flush=True)
        if bad or not err <= DRAW_RTOL or not all(same):
            failures.append(f"draw {name}: {bad} draws differ off a tie, prob err {err:.1e}, counts/first/head "
                            f"equal {same}")
    # The keys' draw inside the drawn blocks: float32 (scores equal to rounding) and bf16 (scores rounded to
    # bf16 on both sides, summed in another order: a draw may cross a CDF step that moved by an ulp).
    for B, Hq, Hkv, c, n_kb, bk, D, units, per, S_cut, dtype, few in KEYS_CASES:
        name = f"{B}x{Hq}/{Hkv}x{c} nKB {n_kb}{f' (<{few})' if few else ''} bk {bk} D {D} {units}x{per}"
        k_blocks = (torch.randn(B, Hkv, n_kb, bk, D, generator=gen) * 2).to(dtype)
        q_mean = torch.randn(B, Hq, c, D, generator=gen)
        blk = torch.randint(0, few or n_kb, (B, Hq, c, units), generator=gen)
        blk[..., 0] = n_kb - 1  # the last block, cut at S
        p_block = torch.rand(B, Hq, c, units, generator=gen, dtype=torch.float64)
        u = _strata(torch.randint(0, 2**40, (B, Hq, c, units), generator=gen), per)
        S = n_kb * bk - S_cut
        args = (S, D**-0.5, 0.25)
        # the torch reference on the same device: on the CPU it scores float32 keys in bf16 (_proxy_dtype)
        want = [x.cpu() for x in keys_in_blocks_torch(q_mean.to(device), k_blocks.to(device), blk.to(device),
                                                      p_block.to(device), *args, u.to(device))]
        fused = (estimate_pieces(q_mean.to(device), 32, 64) or [None] * 3)[2] or keys_in_blocks_torch
        got = [x.cpu() for x in fused(q_mean.to(device), k_blocks.to(device), blk.to(device), p_block.to(device),
                                      *args, u.to(device))]
        tie, rtol = (DRAW_TIE, DRAW_RTOL) if dtype == torch.float32 else (5e-3, 5e-2)
        inner = (q_mean.to(dtype)[..., None, :] @ gather_blocks(k_blocks, blk).mT).float().view(B, Hq, c, units, bk)
        inside = (blk[..., None] * bk + torch.arange(bk)) < S
        w = _mixture(inner[..., None, :] * D**-0.5, inside[..., None, :], 0.25).flatten(-2).double()
        cdf = w.cumsum(-1) / w.sum(-1, keepdim=True)
        near = ((cdf[..., None, :] - u[..., None]).abs() < tie).any(-1).flatten(-2)  # [B, Hq, c, units * per]
        differ = got[0] != want[0]
        bad = int((differ & ~near).sum()) + int((got[0] >= S).sum())
        err = (got[1] / want[1] - 1).abs()[~differ].max().item()
        print(f"keys      {name:40s} {str(dtype)[6:]:8s} draws {differ.numel():6d} differ {int(differ.sum())} "
              f"near {int(near.sum())} bad {bad} prob rel err {err:.1e}", flush=True)
        if bad or not err <= rtol:
            failures.append(f"keys {name} {dtype}: {bad} draws differ off a tie, prob err {err:.1e}")
    # The sample step alone: GQA, a window, per query and per row, a census row, queries that keep nothing.
    for B, Hq, Hkv, T, S, D, bq, r, m, head, window, per_query in SAMPLE_CASES:
        name = (f"{B}x{Hq}/{Hkv} T {T} S {S} D {D} bq {bq} r {r}/{m} head {head} w {window} "
                f"{'query' if per_query else 'row'}")
        q, k = torch.randn(B, Hq, T, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen)
        first, c = 1, math.ceil(T / bq) - 1
        pos = torch.randint(0, S + 20, (B, Hq, c, head + r), generator=gen)  # past S: a census's padding
        weight = torch.rand(B, Hq, c, head + r, generator=gen, dtype=torch.float64) * 3
        weight[..., :head] = (weight[..., :head] > 0.3).double()  # the head: exact keys, weight 1 or 0
        exact = torch.rand(B, Hq, c, generator=gen) < 0.3
        lam = torch.randn(B, Hq, c, bq, generator=gen) + 2
        lam[0, 0, 0, :3] = -math.inf
        args = (first, D**-0.5, window, 1.64, m, per_query, head)
        want = sample_rows_torch(q.double(), k.double(), pos, weight, exact, lam.double(), *args)
        sample = (estimate_pieces(q.to(device), bq, r, head) or [None, None])[1] or sample_rows_torch
        got = sample(q.to(device), k.to(device), pos.to(device), weight.to(device), exact.to(device),
                     lam.to(device), *args).cpu()
        err = (got.double() - want.double()).abs().max().item()
        print(f"sample    {name:66s} max err {err:.1e}", flush=True)
        if not err <= SAMPLE_TOL:
            failures.append(f"sample {name}: error {err:.1e} > {SAMPLE_TOL:.0e}")
    # The whole estimate, block proposal, with both fused steps: the same draws, so the same values.
    config = MaskConfig(block_q=32, block_k=32, top_k=8, sink_blocks=1, local_blocks=1)
    q, k = torch.randn(1, 4, 1024, 64, generator=gen), torch.randn(1, 2, 9000, 64, generator=gen)
    indices = stream_mask(q, k, config).indices
    want = estimate_missed(q.double(), k.double(), indices, config, proposal="block").double()
    qd, kd = q.to(device), k.to(device)
    got = estimate_missed(qd, kd, indices.to(device), config, proposal="block",
                          pieces=estimate_pieces(qd, config.block_q, 64)).cpu().double()
    err = ((got - want).abs() / want.abs().clamp(min=1e-6)).max().item()
    print(f"draw      estimate_missed, block proposal     max rel err {err:.1e} (float32 against float64)", flush=True)
    if not err <= 1e-3:
        failures.append(f"draw: estimate_missed with the fused draw differs by {err:.1e} (relative)")
    # bf16 keys: pre-scores in bf16 (ties are common there, and the fused draw breaks a tie in the exact head
    # to the lower block where torch's topk may not), fused steps against torch's on the same device.
    qb, kb, ib = q.to(device).bfloat16(), k.to(device).bfloat16(), indices.to(device)
    want = estimate_missed(qb, kb, ib, config, proposal="block").cpu().double()
    got = estimate_missed(qb, kb, ib, config, proposal="block", pieces=estimate_pieces(qb, 32, 64)).cpu().double()
    differ = ((got - want).abs() > 1e-3 * want.abs().clamp(min=1e-3)).any(-1)
    print(f"draw      estimate_missed, block proposal, bf16 rows differ {int(differ.sum())} of {differ.numel()} "
          f"(ties of bf16 pre-scores)", flush=True)
    if differ.double().mean() > 0.05:
        failures.append(f"draw: bf16 estimate_missed, {int(differ.sum())} rows differ between fused and torch")
    return failures


def _oracle_tie_rows(q, k, config: MaskConfig, window, scale, rows) -> torch.Tensor:
    """Audited rows ``[B, Hq, r]`` whose float64 middle block scores tie (within ``TIE_RTOL``) at the m-th pick."""
    q, k, sinks, m, lo, n = _float64_contract(q, k, config, window)
    exact = block_scores(q, k, config, scale=scale, window=window).double().index_select(2, rows)
    middle = in_middle(torch.arange(exact.shape[-1])[None, :], lo[rows], n[rows], sinks, config)
    top = torch.sort(exact.masked_fill(~middle, -math.inf), dim=-1, descending=True).values
    if top.shape[-1] <= m:
        return torch.zeros(top.shape[:-1], dtype=torch.bool)
    kth, nxt = top[..., m - 1], top[..., m]
    return torch.isfinite(nxt) & ((kth - nxt).abs() <= TIE_RTOL * kth.abs().clamp(min=1.0))


def _reference_lse(q, k, dense, scale):
    group = q.shape[1] // k.shape[1]
    logits = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * scale
    return logits.masked_fill(~dense, -math.inf).logsumexp(-1).float()  # [B, Hq, T]


_HEADER = (f"{'case':22s} {'dtype':8s} {'rows':>6s} {'differ':>6s} {'ties':>5s} {'bad':>4s} "
           f"{'att_err':>9s} {'att_tol':>9s} {'mass_err':>9s} {'mass_tol':>9s} {'rowsum':>9s} "
           f"{'kern_gap':>9s} {'s':>5s}")


def _fmt(r) -> str:
    return (f"{r['case']:22s} {r['dtype']:8s} {r['rows']:6d} {r['differ']:6d} {r['ties']:5d} "
            f"{r['bad_rows']:4d} {r['att_err']:9.2e} {r['att_tol']:9.2e} {r['mass_err']:9.2e} "
            f"{r['mass_tol']:9.2e} {r['rowsum']:9.2e} {r['mass_kernel_gap']:9.2e} {r['seconds']:5.1f}")


if __name__ == "__main__":
    sys.exit(main())
