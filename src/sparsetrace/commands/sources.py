"""``sparsetrace sources``: what a span of the text read, through every layer (``analysis.sources``).

Prints the top passages (sentences, paragraphs or blocks) with their score, its error bar where the trace
has missed-mass estimates, the layers where they enter and their text; ``--json`` / ``--csv`` write the
full table.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from .options import output_file, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("sources", help="what a span read: its sources through every layer",
                       description="Propagate the attention of a token span back through all layers of a "
                                   "trace (attention rollout on blocks, mean or max over heads, with a "
                                   "residual share) and rank the passages it read.")
    p.add_argument("trace", type=Path, metavar="DIR", help="trace directory")
    p.add_argument("--span", default=None, metavar="START:END",
                   help="token span whose sources to find, Python slice style (e.g. 1990:2048, or "
                        "--span=-32: for the last 32 tokens); default: the last block, where the next token is read")
    p.add_argument("--top", type=positive_int, default=10, help="passages to print (10)")
    p.add_argument("--unit", choices=("sentence", "paragraph", "block"), default=None,
                   help="passages: sentences (default when the trace has text), paragraphs or blocks")
    p.add_argument("--aggregate", choices=("mean", "max"), default="mean",
                   help="combine heads by their mean (the mix the residual stream receives; default) or max")
    p.add_argument("--residual", type=float, default=0.5,
                   help="share of each layer's flow that stays at its position (rollout: 0.5)")
    p.add_argument("--sink", choices=("no-op", "source"), default="no-op",
                   help="attention to the sink block counts as reading nothing (no-op, default) or as a "
                        "source like any other (plain rollout; the sink then takes most of the flow)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the summary and full table")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE", help="write the full table")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to compute (cpu)")


def run(args: argparse.Namespace) -> int:
    from ..analysis.sources import sources
    from ..store import Trace
    from .options import device_of

    out_json = None if args.json is None else output_file(args.json, (".json",), "--json")
    out_csv = None if args.csv is None else output_file(args.csv, (".csv",), "--csv")
    start = time.perf_counter()
    trace = Trace.load(args.trace, verify=False)  # each shard is hashed before its first read
    found = sources(trace, args.span, aggregate=args.aggregate, residual=args.residual, sink=args.sink,
                    top=args.top, device=device_of(args.device))
    unit = args.unit or ("sentence" if trace.text is not None and trace.token_offsets is not None else "block")
    top = found.top(args.top, unit)
    print(format_report(found, top, unit, trace.num_layers))
    if out_json is not None or out_csv is not None:
        rows = found.rows(unit)
        if out_json is not None:
            out_json.write_text(json.dumps({**found.summary(args.top, unit), "rows": rows}, indent=1) + "\n",
                                encoding="utf-8")
        if out_csv is not None:
            _write_csv(out_csv, rows)
        print("wrote " + ", ".join(str(p) for p in (out_json, out_csv) if p is not None))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


def _one_line(text: str | None, n: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def format_report(found, top: list[dict], unit: str, num_layers: int) -> str:
    """The printed table: the settings and span, then one line per passage (error bars where the trace has
    missed-mass estimates)."""
    a, b = found.span
    sink = ("sink: block 0 as a no-op" if found.sink_blocks == 1 else f"sink: blocks 0-{found.sink_blocks - 1} "
            "as no-ops") if found.sink == "no-op" else "sink as a source"
    lines = [f"sources of tokens {a:,}–{b:,} over {num_layers} layers ({found.aggregate} over heads, residual "
             f"{found.residual:g}, {sink})",
             f"  span: \"{_one_line(found.span_text(a, b), 100)}\""]
    if found.has_missed:
        lines.append(f"  missed mass: error bars from the trace's estimates; unattributed flow "
                     f"{found.unattributed:.3f}")
    bars = found.has_missed
    lines.append(f"{'rank':>4}  {'score':>7}  " + (f"{'[low, high]':<17}  " if bars else "")
                 + f"{'tokens':<13}  {'enters at (share of its score)':<28}  {unit}")
    for row in top:
        enters = ", ".join(f"L{layer} {share:.0%}" for layer, share in row["layers"])
        bar = f"[{row['low']:.4f}, {row['high']:.4f}]  " if bars else ""
        lines.append(f"{row['rank']:>4}  {row['score']:>7.4f}  {bar}"
                     f"{row['token_start']:>5}–{row['token_end']:<6}  {enters:<28}  "
                     f"\"{_one_line(row['text'], 90)}\"")
    if not top:
        lines.append("  (no passage outside the span and the sink received any flow)")
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["rank", "kind", "index", "token_start", "token_end", "score", "low", "high", "entry_layers",
                    "block", "path", "text"])
        for r in rows:
            w.writerow([r["rank"], r["kind"], r["index"], r["token_start"], r["token_end"], f"{r['score']:.6g}",
                        f"{r['low']:.6g}", f"{r['high']:.6g}",
                        " ".join(f"L{layer}:{share:.3f}" for layer, share in r["layers"]), r["block"],
                        "" if r["path"] is None else " ".join(map(str, r["path"])), r["text"] or ""])
