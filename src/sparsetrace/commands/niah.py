"""``sparsetrace niah``: RULER needle-in-a-haystack cases, dense and sparse scores, retrieval routes.

Writes to ``--out``: ``cases.jsonl`` (one case a line), ``results.csv`` and ``routes.json`` (see
:mod:`sparsetrace.runs.niah`), and ``scores.png``, ``needle_mass.png``, ``heads.png``, ``routes.png``.
Each finished case is kept in ``--out/parts/`` until the sweep ends, so a killed sweep resumes when the
same command is rerun; under ``torchrun --nproc-per-node N -m sparsetrace.cli niah ...`` the N processes
share the cases and write the same files (:mod:`sparsetrace.runs.ranks`).
"""

from __future__ import annotations

import argparse
import json
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
    import dataclasses
    import hashlib

    from ..datasets.ruler import parse_length
    from ..runs import niah
    from ..runs.ranks import Ranks
    from ..viz.niah import plot
    from .options import placement

    out = output_dir(args.out)
    lengths = [parse_length(t) for t in niah.split_list(args.lengths)]
    depths = niah.parse_depths(args.depths)
    ks = niah.parse_top_k(args.top_k)
    configs = {k: config_from_args(args, top_k=k) for k in ks if k != "dense"}  # validates every k
    haystack = read_text(args.haystack_file, "--haystack-file") if args.haystack_file else None
    with Ranks.from_env() as ranks:
        placement(args, ranks)  # a GPU asked for but missing fails before anything is written
        cases, warning = niah.prepare_cases(args.model, niah.split_list(args.variant), lengths, depths,
                                            samples=args.samples, seed=args.seed, haystack=haystack,
                                            max_new=args.max_new_tokens, force=args.force)
        if warning and ranks.main:
            print(f"warning: {warning}", file=sys.stderr)
        if ranks.main:
            out.mkdir(parents=True, exist_ok=True)
            niah.write_cases(out, cases)
        loaded = []

        def run_one(i: int) -> dict:
            if not loaded:  # only ranks with cases to run load the model
                loaded.append(load(args, ranks))
            model, tokenizer, model_id = loaded[0]
            rows, reports = niah.case_results(model, tokenizer, cases[i], ks, configs,
                                              max_new=args.max_new_tokens, model_id=model_id)
            print(ranks.tag + niah.case_log(cases[i], rows, i + 1, len(cases)), flush=True)
            return {"rows": rows, "reports": reports}

        def merge(results: list[dict]) -> None:
            rows = [r for result in results for r in result["rows"]]
            reports = [r for result in results for r in result["reports"]]
            niah.write_results(out, rows, reports, cases, ks)
            plot(out, rows, reports, ks)
            print(niah.summary_table(rows, ks))
            print(f"written to {out}")

        cases_json = "\n".join(json.dumps(c.to_json(), sort_keys=True) for c in cases)
        settings = {"model": args.model, "dtype": args.dtype, "top_k": [str(k) for k in ks],
                    "configs": {str(k): dataclasses.asdict(c) for k, c in configs.items()},
                    "max_new_tokens": args.max_new_tokens,
                    "cases": hashlib.sha256(cases_json.encode()).hexdigest()}
        ranks.sweep([c.id for c in cases], run_one, out / "parts", merge=merge, settings=settings,
                    log=print)
    return 0
