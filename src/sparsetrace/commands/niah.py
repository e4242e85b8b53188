"""``sparsetrace niah``: RULER needle-in-a-haystack cases, dense and sparse scores, retrieval routes.

Writes to ``--out``: ``cases.jsonl`` (one case a line), ``results.csv`` and ``routes.json`` (see
:mod:`sparsetrace.runs.niah`), and ``scores.png``, ``needle_mass.png``, ``heads.png``, ``routes.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import add_config_flags, add_model_options, config_from_args, load, output_dir, positive_int, read_text


def add_parser(sub) -> None:
    p = sub.add_parser("niah", help="needle-in-a-haystack sweep: scores dense vs sparse, routes",
                       description="Generate RULER NIAH cases fitted to the model's tokenizer, "
                                   "decode them greedily dense and with STREAM attention at each "
                                   "--top-k, score them (string_match_all) and trace the needle's "
                                   "route to the answer.")
    add_model_options(p, text=False)
    p.add_argument("--variant", default="niah_single_2",
                   help="RULER variant(s), comma-separated (default niah_single_2)")
    p.add_argument("--lengths", default="1k", help="prompt lengths in tokens, e.g. 1k,2k,4k or 600")
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent")
    p.add_argument("--top-k", default="8,16,dense",
                   help="key blocks kept per query block, comma-separated; 'dense' = no pruning")
    p.add_argument("--samples", type=positive_int, default=1, help="cases per (length, depth)")
    p.add_argument("--haystack-file", type=Path, default=None,
                   help="UTF-8 text to use instead of the Paul Graham essays (essay variants)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="greedy tokens at most (default: 12 per number, 32 per uuid, plus 4)")
    p.add_argument("--force", action="store_true",
                   help="run lengths past the model's context window anyway")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_config_flags(p, skip=("top_k",))


def run(args: argparse.Namespace) -> int:
    from ..datasets.ruler import parse_length
    from ..runs import niah
    from ..viz.niah import plot
    from .options import device_of

    device_of(args.device)  # a GPU asked for but missing fails before anything is written
    out = output_dir(args.out)
    lengths = [parse_length(t) for t in niah.split_list(args.lengths)]
    depths = niah.parse_depths(args.depths)
    ks = niah.parse_top_k(args.top_k)
    configs = {k: config_from_args(args, top_k=k) for k in ks if k != "dense"}  # validates every k
    haystack = read_text(args.haystack_file, "--haystack-file") if args.haystack_file else None
    cases, warning = niah.prepare_cases(args.model, niah.split_list(args.variant), lengths, depths,
                                        samples=args.samples, seed=args.seed, haystack=haystack,
                                        max_new=args.max_new_tokens, force=args.force)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    niah.write_cases(out, cases)
    model, tokenizer, model_id = load(args)
    rows, reports = niah.sweep(model, tokenizer, cases, ks, configs, max_new=args.max_new_tokens,
                               model_id=model_id, log=print)
    niah.write_results(out, rows, reports, cases, ks)
    plot(out, rows, reports, ks)
    print(niah.summary_table(rows, ks))
    print(f"written to {out}")
    return 0


