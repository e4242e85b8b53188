"""Coverage budgets (issue 17) on real models: true kept mass of audited rows against P, kept blocks and
sparsity beside fixed-k rows, and fidelity against the dense run.

For each model (default SmolLM2-135M and Gemma 3 270M) the demo text (``haystack_text(12000)``, as `make
demo`; about 2.85k tokens) is traced in memory (at most ``--tokens``) with every fixed ``--fixed-ks`` and
every coverage budget ``--ps`` (at most ``--max-k`` blocks a row, block 32, 1 sink + 1 local, STREAM, 32
audited query blocks per layer, 64 samples a row). For each: mean kept blocks per row, block sparsity,
capped rows, and on the audited rows the mean true kept mass (1 - exact missed) and the share of rows with
true kept mass >= P - 0.02 (all audited rows, and those not capped). With ``--fidelity`` lengths, each model's
KL(dense || sparse) and top-1 agreement over the last 64 positions at each k and P (``sparsetrace
fidelity``'s check) on the first T tokens of the essays (the demo text is their first 12000 characters).
Prints tables and ends with one JSON line; writes bench/results/coverage.json after every run.

    python bench/coverage.py [--tokens 2048] [--ps 0.9,0.95,0.99] [--max-k 32] [--fixed-ks 16,32]
                             [--models smollm2-135m,gemma-3-270m] [--fidelity 1024,2048] [--no-traces]
                             [--device cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparsetrace import TraceConfig, load_model
from sparsetrace.analysis.audit import COVERAGE_SLACK, coverage_summary
from sparsetrace.datasets.essays import haystack_text
from sparsetrace.runs import fidelity
from sparsetrace.tracing.tracer import tokenize, trace_ids

OUT = Path(__file__).parent / "results" / "coverage.json"


def audited_kept(trace) -> torch.Tensor:
    """1 - exact missed mass of every audited row, ``[L, H, r]`` float64."""
    return 1 - trace.audit()["missed"].double()


def trace_row(model, ids, config: TraceConfig, name: str, P: float | None) -> dict:
    start = time.perf_counter()
    trace = trace_ids(model, ids, config)
    seconds = time.perf_counter() - start
    kept = audited_kept(trace)
    row = {"run": name, "P": P, "tokens": trace.num_tokens, "width": config.mask.width,
           "mean_kept_blocks": trace.mean_kept_blocks,
           "sparsity": trace.sparsity, "true_kept_mean": float(kept.mean()), "true_kept_p10": float(kept.quantile(0.1)),
           "audited_rows": int(kept.numel()), "seconds": seconds}
    if P is not None:
        c = coverage_summary(trace)
        row.update(met_share=c["met_share"], met_share_not_capped=c["met_share_not_capped"],
                   capped_share=c["capped_share"], capped_audited=c["capped_audited"])
        # How the estimate behind the cut compares with the truth on the audited rows (kept-mass scale).
        est = torch.stack([torch.stack([trace.missed(layer, h)[trace.audit()["query_block"], 0]
                                        for h in range(trace.num_heads)]) for layer in range(trace.num_layers)])
        row["estimated_kept_mean"] = float((1 - est.double()).mean())
        # Sliding-window layers (Gemma 3: 15 of 18) keep every candidate of their window at a large max_k,
        # so their audited rows meet P exactly; the full-attention layers alone are the real test.
        types = trace.meta["model"].get("layer_types") or ["full_attention"] * trace.num_layers
        full = [i for i, t in enumerate(types) if t != "sliding_attention"]
        if len(full) < trace.num_layers:
            capped = torch.stack([torch.stack([trace.capped(layer, h)[trace.audit()["query_block"]]
                                               for h in range(trace.num_heads)]) for layer in full])
            met = kept[full] >= P - COVERAGE_SLACK
            row.update(full_layers=full, met_share_full_layers=float(met.double().mean()),
                       met_share_full_layers_not_capped=float(met[~capped].double().mean()),
                       true_kept_mean_full_layers=float(kept[full].mean()))
    return row


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| run | width | mean kept blocks | block sparsity | true kept mean | p10 | rows >= P-0.02 | "
          "(not capped) | capped rows | est. kept mean | time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        def pct(key, r=r):
            return "" if r.get(key) is None else f"{r[key]:.1%}"
        est = "" if r.get("estimated_kept_mean") is None else f"{r['estimated_kept_mean']:.3f}"
        print(f"| {r['run']} | {r['width']} | {r['mean_kept_blocks']:.2f} | {r['sparsity']:.3f} | "
              f"{r['true_kept_mean']:.3f} | {r['true_kept_p10']:.3f} | {pct('met_share')} | "
              f"{pct('met_share_not_capped')} | {pct('capped_share')} | {est} | {r['seconds']:.0f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ps", default="0.9,0.95,0.99")
    ap.add_argument("--max-k", type=int, default=32)
    ap.add_argument("--fixed-ks", default="16,32")
    ap.add_argument("--models", default="smollm2-135m,gemma-3-270m")
    ap.add_argument("--fidelity", default="", help="lengths for the fidelity check of every model, e.g. 1024,2048")
    ap.add_argument("--no-traces", dest="traces", action="store_false",
                    help="skip the audited traces of the demo text (fidelity only)")
    ap.add_argument("--device", default="cpu", help="run the models here (cpu, cuda)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"JSON to write (default {OUT})")
    args = ap.parse_args()
    ps = [float(p) for p in args.ps.split(",") if p]
    ks = [int(k) for k in args.fixed_ks.split(",") if k]
    text = haystack_text(12000)
    results: dict = {"tokens": args.tokens, "max_k": args.max_k, "slack": COVERAGE_SLACK, "traces": {},
                     "fidelity": [], "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")

    loaded = {}
    for name in [m for m in args.models.split(",") if m]:
        model, tokenizer = load_model(name)
        model, tokenizer = loaded[name] = model.to(args.device), tokenizer
        if not args.traces:
            continue
        ids, _ = tokenize(tokenizer, text, args.tokens)
        rows = results["traces"][name] = []
        runs = [(f"k={k}", TraceConfig.of(top_k=k), None) for k in ks]
        runs += [(f"P={p}", TraceConfig.of(coverage=p, max_k=args.max_k), p) for p in ps]
        for run_name, config, P in runs:
            rows.append(trace_row(model, ids, config, run_name, P))
            print(json.dumps({name: rows[-1]}), flush=True)
            save()
        print_rows(f"{name}, {ids.shape[0]} tokens of the demo text (max_k {args.max_k})", rows)

    lengths = [int(t) for t in args.fidelity.split(",") if t]
    if lengths:
        long_text = haystack_text(max(12000, 6 * max(lengths)))  # the demo text is its first 12000 characters
        for name, (model, tokenizer) in loaded.items():
            for T in lengths:
                ids, _ = tokenize(tokenizer, long_text, T)
                dense = fidelity.dense_reference(model, ids, chunk_size=1024, last_n=64, block_size=32)
                runs = [(f"k={k}", TraceConfig.of(top_k=k)) for k in ks]
                runs += [(f"P={p}", TraceConfig.of(coverage=p, max_k=args.max_k)) for p in ps]
                for run_name, config in runs:
                    r = fidelity.check(model, ids, config, last_n=64, dense=dense)
                    results["fidelity"].append({"model": name, "tokens": ids.shape[0], "run": run_name, "kl": r.kl,
                                                "kl_max": r.kl_max, "top1": r.top1_agreement,
                                                "criterion": r.criterion_passed, "sparsity": r.sparsity})
                    print(json.dumps(results["fidelity"][-1]), flush=True)
                    save()
        print("\n| model | tokens | run | block sparsity | KL mean | KL max | top-1 | criterion |")
        print("|---|---:|---|---:|---:|---:|---:|---|")
        for r in results["fidelity"]:
            print(f"| {r.get('model', 'smollm2-135m')} | {r['tokens']} | {r['run']} | {r['sparsity']:.3f} | "
                  f"{r['kl']:.3e} | {r['kl_max']:.3e} | {r['top1']:.3f} | {'pass' if r['criterion'] else 'fail'} |")
    save()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
