"""``sparsetrace view``: serve a local web viewer over a trace directory (loopback only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import nonnegative_int


def add_parser(sub) -> None:
    p = sub.add_parser("view", help="browse a trace in a local web viewer",
                       description="Serve a web page over a trace directory on 127.0.0.1: an "
                                   "overview of all layers x heads, a zoomable block map per "
                                   "head, and the text shaded by attention received. Data is "
                                   "loaded lazily, so a 1M-token trace opens at once.")
    p.add_argument("trace", type=Path, metavar="DIR", help="trace directory")
    p.add_argument("--port", type=nonnegative_int, default=8000,
                   help="port to listen on; 0 picks a free one (default 8000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="loopback address to listen on (default 127.0.0.1)")
    p.add_argument("--anchors", type=Path, default=None,
                   help="out dir of `sparsetrace anchors` (heads.csv / anchors.json: kurtosis)")
    p.add_argument("--niah", type=Path, default=None,
                   help="out dir of `sparsetrace niah` (routes.json: needle mass)")
    p.add_argument("--log", action="store_true", help="log every request to stderr")


def run(args: argparse.Namespace) -> int:
    from ..store import Trace
    from ..tracing.models import cache_home
    from ..viz.server import serve

    trace = Trace.load(args.trace, verify=False)  # each shard is hashed before its first read
    try:
        serve(trace, host=args.host, port=args.port, anchors=args.anchors, niah=args.niah,
              cache_dir=cache_home() / "viz", quiet=not args.log)
    except KeyboardInterrupt:
        print("stopped")
    return 0
