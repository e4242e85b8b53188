"""``sparsetrace report``: write one self-contained HTML report of a trace (no network needed)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .options import output_file, positive_int


def head_list(text: str) -> list[tuple[int, int]]:
    """argparse type: "3:1,5:0" -> [(3, 1), (5, 0)]."""
    try:
        return [tuple(int(x) for x in part.split(":")) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give heads as LAYER:HEAD[,LAYER:HEAD...]") from None


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report of a trace",
                       description="Write one HTML file (data embedded, no network) with the "
                                   "overview of all layers x heads and the block maps of a few "
                                   "heads; opens from disk and displays in Jupyter.")
    p.add_argument("trace", type=Path, metavar="DIR", help="trace directory")
    p.add_argument("--out", type=Path, required=True, help="HTML file to write")
    p.add_argument("--heads", type=head_list, default=None,
                   help="heads to show as LAYER:HEAD,... (default: the --n-heads heads with the "
                        "largest --by metric)")
    p.add_argument("--n-heads", type=positive_int, default=4, help="heads to pick (default 4)")
    p.add_argument("--by", default="other",
                   choices=("other", "offdiag", "sink", "diagonal", "entropy", "sparsity",
                            "kurtosis", "needle_mass", "missed", "missed_audited"),
                   help="pick the heads with the largest: other (mass off the diagonal and off "
                        "the sink; default), offdiag, ..., kurtosis (needs --anchors), "
                        "needle_mass (needs --niah), missed / missed_audited (estimated / exactly "
                        "audited missed attention mass; traces with an audit)")
    p.add_argument("--max-cells", type=positive_int, default=256,
                   help="block maps are aggregated to at most this many cells a side (256)")
    p.add_argument("--anchors", type=Path, default=None, help="out dir of `sparsetrace anchors`")
    p.add_argument("--niah", type=Path, default=None, help="out dir of `sparsetrace niah`")
    p.add_argument("--no-sources", action="store_true",
                   help="leave out what the last block read (its sources over all layers)")


def run(args: argparse.Namespace) -> int:
    from ..store import Trace
    from ..tracing.models import cache_home
    from ..viz.report import write_report

    out = output_file(args.out, (".html", ".htm"))
    start = time.perf_counter()
    trace = Trace.load(args.trace, verify=False)  # each shard is hashed before its first read
    size = write_report(trace, out, cache_dir=cache_home() / "viz", heads=args.heads, n_heads=args.n_heads,
                        max_cells=args.max_cells, anchors=args.anchors, niah=args.niah, by=args.by,
                        sources=not args.no_sources)
    print(f"wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return 0
