"""Calibration of the missed-mass estimator against the exact audit, on real post-RoPE queries and keys
(SmolLM2-135M and Gemma 3 270M over a few thousand tokens of Paul Graham essays, block 32), and the cost
of both next to a real CPU trace.

For every model, k in {4, 8, 16, 32} and selection (stream_mask, shortlist_mask, oracle_mask): on a seeded,
position-stratified sample of droppable query blocks per layer (the same rows for every head), the exact
missed mass and recall (sparsetrace.audit.audit_rows) against the per-row estimate
(sparsetrace.audit.estimate_missed, 64 keys a row, 90% intervals) of every row: interval coverage (the
share of audited rows whose exact missed mass lies in [low, high]), median absolute error, mean width,
exact missed mass mean / p90, recall of the kept selection against the oracle's searched blocks.
Checks on real data: the exact audit against a float64 dense softmax (to 1e-3) and its oracle rows
against oracle_mask's rows (equal).
The cost of both inside a real trace is measured by bench/audit_trace.py.
Prints tables, ends with one JSON line; writes (merges per model into) bench/results/audit_calibration.json.

    python bench/audit_calibration.py [--models smollm2-135m,gemma-3-270m] [--tokens 4096]
        [--audit-rows 48] [--proposals key,block] [--layers 0,5]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from sparsetrace import MaskConfig, load_model, oracle_mask, shortlist_mask, stream_mask
from sparsetrace.audit.estimate import estimate_missed, kept_logsumexp
from sparsetrace.audit.exact import audit_query_blocks, audit_rows, droppable_query_blocks
from sparsetrace.datasets.essays import haystack_text
from sparsetrace.selection.oracle import block_scores, top_middle
from sparsetrace.tracing.cpu import keep_freed_memory
from sparsetrace.tracing.probe import capture_qk
from sparsetrace.tracing.tracer import tokenize

BLOCK, SINK, LOCAL = 32, 1, 1


def dense_missed_f64(q, k, indices, rows, scale, window, T, S):
    """Float64 reference: missed mass of the query blocks ``rows`` from the full softmax [Hq, t, S]."""
    Hq, Hkv = q.shape[0], k.shape[0]
    out = torch.zeros(Hq, len(rows), dtype=torch.float64)
    kk = k.double().repeat_interleave(Hq // Hkv, dim=0)
    for n, i in enumerate(rows.tolist()):
        t = torch.arange(i * BLOCK, min((i + 1) * BLOCK, T))
        logits = (q[:, t].double() @ kk.transpose(-1, -2)) * scale  # [Hq, bq, S]
        qp, kp = t[:, None] + (S - T), torch.arange(S)[None, :]
        ok = (kp <= qp) & ((kp > qp - window) if window else True)
        p = torch.softmax(logits.masked_fill(~ok, -math.inf), -1)
        kept = torch.zeros(Hq, math.ceil(S / BLOCK) + 1, dtype=torch.bool)
        ids = indices[:, i].long()
        kept.scatter_(-1, ids.masked_fill(ids < 0, kept.shape[1] - 1), True)
        kept_keys = kept[:, :-1].repeat_interleave(BLOCK, -1)[:, :S]  # [Hq, S]
        out[:, n] = (1 - (p * kept_keys[:, None, :]).sum(-1)).mean(-1)
    return out


def calibrate(name: str, args) -> dict:
    model, tokenizer = load_model(name)
    ids, _ = tokenize(tokenizer, haystack_text(args.tokens * 6), max_tokens=args.tokens)
    T = S = ids.shape[0]
    layers = capture_qk(model, ids)
    del model
    chosen = sorted(layers) if args.layers is None else [int(x) for x in args.layers.split(",")]
    ks = [int(x) for x in args.ks.split(",")]
    proposals = args.proposals.split(",")
    nQ = math.ceil(T / BLOCK)
    acc: dict[tuple, dict[str, list]] = {}
    checks = {"dense_f64_max_abs_diff": 0.0, "oracle_rows_equal": True, "checked_layers": []}
    seconds = {"block_scores": 0.0, "audit": 0.0, "kept_lse": 0.0, **{p: 0.0 for p in proposals}}
    # float64 / oracle_mask checks on the first and a middle layer, and on one layer of the other kind
    # (global vs sliding window) when the model has both
    check_layers = {chosen[0], chosen[len(chosen) // 2]}
    check_layers |= {next((x for x in chosen if layers[x][3] != layers[chosen[0]][3]), chosen[0])}
    start = time.perf_counter()
    for layer in chosen:
        q, k, scale, window = layers[layer]
        qb, kb = q[None], k[None]
        tic = time.perf_counter()
        scores = block_scores(qb, kb, MaskConfig(block_q=BLOCK, block_k=BLOCK, top_k=max(ks)), scale=scale,
                              window=window)  # [1, Hq, nQ, nKB], shared by every k
        seconds["block_scores"] += time.perf_counter() - tic
        check = layer in check_layers
        for top_k in ks:
            config = MaskConfig(block_q=BLOCK, block_k=BLOCK, top_k=top_k, sink_blocks=SINK, local_blocks=LOCAL)
            drop = droppable_query_blocks(T, S, config, window=window)
            if not drop.any():
                continue
            rows = audit_query_blocks(nQ, args.audit_rows, seed=args.seed, layer=layer,
                                      first=int(drop.nonzero()[0]))
            kw = dict(scale=scale, window=window)
            selections = {
                "stream": stream_mask(qb, kb, config, **kw).indices,
                "shortlist": shortlist_mask(qb, kb, config, **kw).indices,
                "oracle": top_middle(scores, T, S, config, window),
            }
            for sel, indices in selections.items():
                tic = time.perf_counter()
                missed, recall, o_rows = audit_rows(qb, kb, indices, rows, config, return_oracle=True, **kw)
                seconds["audit"] += time.perf_counter() - tic
                if check and top_k == 8:
                    want = dense_missed_f64(q, k, indices[0], rows, scale, window, T, S)
                    diff = (missed[0].double() - want).abs().max().item()
                    checks["dense_f64_max_abs_diff"] = max(checks["dense_f64_max_abs_diff"], diff)
                    full = oracle_mask(qb, kb, config, **kw).indices[:, :, rows]
                    checks["oracle_rows_equal"] &= bool(torch.equal(o_rows, full))
                    checks["checked_layers"] = sorted(set(checks["checked_layers"]) | {layer})
                tic = time.perf_counter()
                lse = kept_logsumexp(qb, kb, indices, config, **kw)
                seconds["kept_lse"] += time.perf_counter() - tic
                for prop in proposals:
                    tic = time.perf_counter()
                    est = estimate_missed(qb, kb, indices, config, **kw, samples=args.samples, proposal=prop,
                                          seed=args.seed * 1000 + layer, kept_lse=lse)
                    seconds[prop] += time.perf_counter() - tic
                    est = est[0][:, rows].double()  # [Hq, r, 3]
                    truth = missed[0].double()
                    a = acc.setdefault((prop, top_k, sel), {x: [] for x in
                                                            ("cover", "err", "width", "missed", "recall")})
                    a["cover"].append(((est[..., 1] <= truth + 1e-6) & (truth <= est[..., 2] + 1e-6)).flatten())
                    a["err"].append((est[..., 0] - truth).abs().flatten())
                    a["width"].append((est[..., 2] - est[..., 1]).flatten())
                    a["missed"].append(truth.flatten())
                    a["recall"].append(recall[0].double().flatten())
        print(f"{name} layer {layer} done ({time.perf_counter() - start:.0f} s)", flush=True)

    rows_out = []
    for (prop, top_k, sel), a in sorted(acc.items()):
        cover, err, width = (torch.cat(a[x]).double() for x in ("cover", "err", "width"))
        missed, recall = torch.cat(a["missed"]), torch.cat(a["recall"])
        rows_out.append({
            "proposal": prop, "top_k": top_k, "selection": sel, "rows": len(cover),
            "coverage": round(cover.mean().item(), 4), "median_abs_err": round(err.median().item(), 5),
            "mean_width": round(width.mean().item(), 4), "missed_mean": round(missed.mean().item(), 4),
            "missed_p90": round(missed.quantile(0.9).item(), 4),
            "recall": round(recall[~recall.isnan()].mean().item(), 4),
        })
    return {"tokens": T, "layers": chosen, "audit_rows_per_layer": args.audit_rows,
            "samples": args.samples, "level": 0.9, "rows": rows_out, "checks": checks,
            "seconds": {key: round(v, 1) for key, v in seconds.items()},
            "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma-3-270m")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ks", default="4,8,16,32")
    parser.add_argument("--audit-rows", type=int, default=48, help="audited query blocks per layer")
    parser.add_argument("--samples", type=int, default=64, help="keys drawn per row by the estimator")
    parser.add_argument("--proposals", default="key,block")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/audit_calibration.json"))
    args = parser.parse_args()
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    result = json.loads(args.json.read_text()) if args.json.exists() else {}
    result.setdefault("models", {})
    for name in [m for m in args.models.split(",") if m]:
        result["models"][name] = calibrate(name, args)
        print_model(name, result["models"][name])
    result["date"] = time.strftime("%Y-%m-%d")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def print_model(name: str, r: dict) -> None:
    print(f"\n{name}: {r['tokens']} tokens, block {BLOCK}, sink {SINK} + local {LOCAL}, "
          f"{r['audit_rows_per_layer']} audited query blocks a layer, {r['samples']} keys a row, 90 % intervals")
    print("| proposal | k | selection | audited rows | coverage | median abs err | mean width "
          "| exact missed mean | p90 | recall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        print(f"| {x['proposal']} | {x['top_k']} | {x['selection']} | {x['rows']} | {x['coverage']:.3f} | "
              f"{x['median_abs_err']:.4f} | {x['mean_width']:.4f} | {x['missed_mean']:.3f} | "
              f"{x['missed_p90']:.3f} | {x['recall']:.3f} |")
    c = r["checks"]
    print(f"checks (k=8, layers {c['checked_layers']}): exact audit vs float64 dense max |diff| "
          f"{c['dense_f64_max_abs_diff']:.1e}; audit oracle rows == oracle_mask rows: {c['oracle_rows_equal']}")
    print(f"seconds: {r['seconds']}, wall {r['wall_s']} s")


if __name__ == "__main__":
    main()
