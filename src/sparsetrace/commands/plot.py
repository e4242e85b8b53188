"""``sparsetrace plot``: a static block-map picture (PNG/PDF/SVG) of one head."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import output_file, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw one head's block map to an image (matplotlib)",
                       description="Draw the block map (query x key blocks, colour = mass, log "
                                   "scale) of one head, aggregated to at most --max-cells cells "
                                   "a side so it reads at any length.")
    p.add_argument("trace", type=Path, metavar="DIR", help="trace directory")
    p.add_argument("--layer", type=int, required=True, help="layer (negative counts from the end)")
    p.add_argument("--head", type=int, required=True, help="query head")
    p.add_argument("--out", type=Path, required=True, help="image to write (.png, .pdf, .svg)")
    p.add_argument("--max-cells", type=positive_int, default=1000,
                   help="at most this many cells a side (default 1000)")
    p.add_argument("--reduce", choices=("max", "sum"), default="max",
                   help="cell value: max mass of a kept block, or mean mass sent to the cell")


def run(args: argparse.Namespace) -> int:
    from ..store import Trace
    from ..viz.plot import plot_block_map

    out = output_file(args.out, (".png", ".pdf", ".svg"))
    trace = Trace.load(args.trace, verify=False)  # each shard is hashed before its first read
    plot_block_map(trace, args.layer, args.head, out, max_cells=args.max_cells, reduce=args.reduce)
    print(f"wrote {out}")
    return 0
