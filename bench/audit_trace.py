"""The audit inside real traces: its cost against the same trace unaudited, and where the selection drops
attention (by layer, by position decile, by k).

For every length (default 8k and 32k tokens of Paul Graham essays, SmolLM2-135M on this CPU, block 32,
top_k 16, chunks of 1024) the same text is traced in three modes in one process: without audit or
estimate, with the exact audit only (``audit_rate`` query blocks per layer), and with the audit and the
per-row missed-mass estimate (the default). ``--rounds`` repeats the three, the order reversed every
other round (later runs in a process come out slower on a shared CPU, so a fixed order favours the first
mode), and each mode keeps its fastest time. Overhead = time / unaudited time - 1.
``--tables`` also traces the demo text (the first 2048 tokens of ``haystack_text(12000)``, as `make demo`)
at every ``--ks`` and writes the audited missed mass and recall by layer and by position decile of the
audited query blocks, for the demo text at each k and for the longest overhead run.
Prints tables and ends with one JSON line; writes bench/results/audit_trace.json.

    python bench/audit_trace.py [--lengths 8192,32768] [--rounds 2] [--tables] [--ks 8,16,32]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from sparsetrace import TraceConfig, load_model
from sparsetrace.analysis.audit import audit_summary, missed_by_layer, missed_by_position
from sparsetrace.datasets.essays import haystack_text
from sparsetrace.tracing.tracer import trace_text

MODES = {"unaudited": dict(audit_rate=0, missed_samples=0), "audit": dict(missed_samples=0), "audit+estimate": {}}


def tables(trace) -> dict:
    """Audited missed mass and recall by layer and by position decile of the audited query blocks (the
    point values of ``analysis.audit.missed_by_layer`` / ``missed_by_position``, whose bootstrap intervals
    the report plots)."""
    layers, deciles = missed_by_layer(trace)["audited"], missed_by_position(trace, bins=10)["bins"]
    def value(stat):  # JSON nulls (undefined recall) as NaN, as the tables print them
        return math.nan if stat[0] is None else stat[0]

    by_layer = [{"layer": layer, "missed": value(missed), "recall": value(recall)}
                for layer, (missed, recall) in enumerate(zip(layers["mean"], layers["recall"], strict=True))]
    by_decile = [{"decile": d["bin"], "rows": d["audited_blocks"], "missed": value(d["audited"]),
                  "recall": value(d["recall"])} for d in deciles if d["audited_blocks"]]
    return {"by_layer": by_layer, "by_decile": by_decile, "summary": audit_summary(trace)}


def print_tables(name: str, t: dict) -> None:
    s = t["summary"]
    print(f"\n{name}: missed mean {s['missed_mean'][0]:.3f} ({s['missed_mean'][1]:.3f}..{s['missed_mean'][2]:.3f}), "
          f"p90 {s['missed_p90'][0]:.3f}, recall {s['recall_mean'][0]:.3f}, interval coverage "
          f"{s.get('interval_coverage', math.nan):.3f}")
    print("| position decile | audited blocks | missed | recall |\n|---:|---:|---:|---:|")
    for r in t["by_decile"]:
        print(f"| {r['decile']} | {r['rows']} | {r['missed']:.3f} | {r['recall']:.3f} |")
    print("| layer | missed | recall |\n|---:|---:|---:|")
    for r in t["by_layer"]:
        print(f"| {r['layer']} | {r['missed']:.3f} | {r['recall']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="runs of every mode, alternating order; fastest kept")
    parser.add_argument("--tables", action="store_true", help="also the demo text at every --ks")
    parser.add_argument("--ks", default="8,16,32")
    parser.add_argument("--json", type=Path, default=Path("bench/results/audit_trace.json"))
    args = parser.parse_args()
    model, tokenizer = load_model()
    result = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "overhead": [], "tables": {}}
    lengths = [int(x) for x in args.lengths.split(",") if x]
    for tokens in lengths:
        text = haystack_text(tokens * 6)
        row = {"tokens": tokens, "top_k": args.top_k, "rounds": args.rounds}
        for round_ in range(args.rounds):
            for mode in list(MODES)[::-1 if round_ % 2 else 1]:
                config = TraceConfig.of(top_k=args.top_k, **MODES[mode])
                start = time.perf_counter()
                run = trace_text(model, tokenizer, text, config, max_tokens=tokens)
                seconds = round(time.perf_counter() - start, 1)
                row.setdefault(f"{mode}_runs_s", []).append(seconds)
                row[f"{mode}_s"] = min(row[f"{mode}_runs_s"])
                if mode == "audit+estimate":
                    trace = run
                print(f"{tokens} tokens, {mode}, round {round_ + 1}: {seconds} s", flush=True)
        row["audit_overhead"] = round(row["audit_s"] / row["unaudited_s"] - 1, 4)
        row["audit_estimate_overhead"] = round(row["audit+estimate_s"] / row["unaudited_s"] - 1, 4)
        result["overhead"].append(row)
        if tokens == max(lengths):
            result["tables"][f"essays_{tokens}_k{args.top_k}"] = tables(trace)
    print("\n| tokens | k | unaudited | audit | audit + estimate | audit overhead | audit + estimate overhead |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["overhead"]:
        print(f"| {r['tokens']} | {r['top_k']} | {r['unaudited_s']} s | {r['audit_s']} s | {r['audit+estimate_s']} s "
              f"| {100 * r['audit_overhead']:.1f} % | {100 * r['audit_estimate_overhead']:.1f} % |")
    if args.tables:
        text = haystack_text(12000)
        for k in (int(x) for x in args.ks.split(",")):
            trace = trace_text(model, tokenizer, text, TraceConfig.of(top_k=k), max_tokens=2048)
            result["tables"][f"demo_2048_k{k}"] = tables(trace)
    for name, t in result["tables"].items():
        print_tables(name, t)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
