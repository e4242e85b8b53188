"""How long ``sources`` takes: the library call and the ``sparsetrace sources`` command end to end.

    python bench/sources_speed.py                          # synthetic 20k and 1M-token traces (28 x 12 heads)
    python bench/sources_speed.py --trace demo=out/demo-trace   # and a real trace (make demo writes this one)
    python bench/sources_speed.py --device cuda            # on a GPU: the same, computed there
                                                           # (-> bench/results/sources_speed_cuda.json)

``--device auto`` (the default) takes the GPU where there is one. On a GPU machine the 1M-token trace is written
first (once, a few minutes on its CPU); only the propagation runs on the GPU, reading the trace's memory-mapped
shards layer by layer as on the CPU.

The 1M-token trace (1,048,544 tokens = 32767 blocks of 32; 28 layers x 12 heads, top_k 16) is the one
bench/viewer.py uses, written once into $SPARSETRACE_HOME/bench/trace-1m and reused. For each trace:
``sources()`` under "mean" and "max" (the span: the last block; paths of the top 10), under "mean" with
missed-mass error bars (made-up estimates where the trace has none), the top-10 sentences table, and the
command ``sparsetrace sources DIR --top 10`` as a subprocess (Python start-up and imports included; the
number a user waits for). Prints a table, writes bench/results/sources_speed.json (sources_speed_cuda.json
on a GPU; --out elsewhere), ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparsetrace.analysis.sources import sources
from sparsetrace.store import Trace, TraceError
from sparsetrace.tracing.models import cache_home
from sparsetrace.viz.synthetic import write_synthetic_trace

RESULTS = Path(__file__).with_name("results") / "sources_speed.json"
SYNTHETIC = {"syn-20k": (20_000, 28, 12), "syn-1m": (1_048_544, 28, 12)}


def ensure_trace(path: Path, tokens: int, layers: int, heads: int) -> Trace:
    try:
        return Trace.load(path, verify=False)
    except TraceError:
        print(f"writing a {tokens:,}-token synthetic trace to {path} (once) ...", flush=True)
        return write_synthetic_trace(path, num_tokens=tokens, num_layers=layers, num_heads=heads, top_k=16,
                                     block_size=32, progress=True)


def measure(name: str, path: Path, device: str) -> dict:
    trace = Trace.load(path, verify=False)
    row = {"trace": name, "tokens": trace.num_tokens, "layers": trace.num_layers, "heads": trace.num_heads,
           "top_k": trace.top_k, "missed_mass": trace.has_missed, "device": device}
    for aggregate in ("mean", "max"):
        trace = Trace.load(path, verify=False)  # a fresh handle: shards hashed again before first read
        start = time.perf_counter()
        found = sources(trace, aggregate=aggregate, top=10, device=device)
        row[f"{aggregate}_s"] = time.perf_counter() - start
        start = time.perf_counter()
        top = found.top(10, "sentence" if trace.text is not None else "block")
        row[f"{aggregate}_table_s"] = time.perf_counter() - start
        row[f"{aggregate}_top"] = [[r["token_start"], r["token_end"], round(r["score"], 6)] for r in top[:3]]
    if not trace.has_missed:  # the cost of error bars (3 flow columns), with made-up estimates [L, H, nQ, 3]
        g = torch.Generator().manual_seed(0)
        mu = torch.rand(trace.num_layers, trace.num_heads, trace.num_query_blocks, 1, generator=g) * 0.2
        bars = torch.cat([mu, mu * 0.8, mu * 1.2], -1)
        trace = Trace.load(path, verify=False)
        start = time.perf_counter()
        sources(trace, aggregate="mean", missed=bars, top=10, device=device)
        row["mean_bars_s"] = time.perf_counter() - start
        del bars
    else:
        row["mean_bars_s"] = row["mean_s"]  # the trace's own estimates were used
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sparsetrace.cli", "sources", str(path), "--top", "10",
                           "--device", device], capture_output=True, text=True)
    row["cli_s"] = time.perf_counter() - start
    row["cli_ok"] = done.returncode == 0 and "rank" in done.stdout
    if not row["cli_ok"]:
        print(done.stdout[-2000:], done.stderr[-2000:])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", action="append", default=[], metavar="NAME=DIR", help="a trace directory to time")
    p.add_argument("--no-synthetic", action="store_true", help="only the --trace directories")
    p.add_argument("--only", nargs="*", default=None, help="synthetic traces to time (syn-20k, syn-1m)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where sources() computes (auto: the GPU where there is one)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: bench/results/sources_speed"
                                                          "[_cuda].json)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here")
    if args.out is None:
        args.out = RESULTS if args.device == "cpu" else RESULTS.with_name("sources_speed_cuda.json")
    traces = [(n, Path(d)) for n, d in (t.split("=", 1) for t in args.trace)]
    if not args.no_synthetic:
        for name, (tokens, layers, heads) in SYNTHETIC.items():
            if args.only is None or name in args.only:
                path = cache_home() / "bench" / ("trace-1m" if name == "syn-1m" else f"sources-{name}")
                ensure_trace(path, tokens, layers, heads)
                traces.append((name, path))
    if args.device == "cuda":  # the CUDA context and kernels' first launches are not what we time
        warm = Trace.load(traces[0][1], verify=False)
        sources(warm, aggregate="max", top=1, device="cuda")
        torch.cuda.synchronize()
    rows = []
    for name, path in traces:
        rows.append(measure(name, path, args.device))
        r = rows[-1]
        print(f"{name}: mean {r['mean_s']:.1f} s, max {r['max_s']:.1f} s, command {r['cli_s']:.1f} s", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\n{'trace':<10} {'tokens':>10} {'L x H':>7} {'k':>3} {'mean: s':>8} {'+bars: s':>9} {'max: s':>8} "
          f"{'table: s':>9} {'command: s':>11}")
    for r in rows:
        print(f"{r['trace']:<10} {r['tokens']:>10,} {r['layers']:>3}x{r['heads']:<3} {r['top_k']:>3} "
              f"{r['mean_s']:>8.2f} {r['mean_bars_s']:>9.2f} {r['max_s']:>8.2f} {r['mean_table_s']:>9.2f} "
              f"{r['cli_s']:>11.2f}")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    result = {"bench": "sources_speed", "device": args.device, "gpu": gpu, "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
              "load_average_after": load, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"bench": "sources_speed", "device": args.device, "gpu": gpu,
                      "rows": [{k: r[k] for k in ("trace", "mean_s", "mean_bars_s", "max_s", "cli_s")}
                                                         for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
