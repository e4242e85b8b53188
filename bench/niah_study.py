"""NIAH study: where SmolLM2-135M and Gemma-3-270M retrieve, where sparsity breaks retrieval, which selection
(STREAM, SHORTLIST, the exact oracle) keeps the needle at the same k, and the routes of successes versus
failures.

For each model, RULER variant, length, depth, selection and k (dense, then fewer kept blocks), decode
greedily (dense sdpa and sparse attention), score with RULER's string_match_all, and read the needle
mass, the share of heads per layer whose answer block keeps the needle's block, and the best needle ->
answer route from the sparse prefill's trace. ``--estimators stream,shortlist,oracle`` labels each sparse
cell ``estimator:k`` (STREAM alone keeps the plain k of earlier results). Results accumulate in
bench/results/niah.json (cases already there are skipped); while a run lasts each finished case is kept in
bench/results/niah.parts/, so a killed run resumes. ``--coverage 0.9,0.95,0.99 --max-k 64`` adds cells
``P<p>`` traced under coverage budgets (issue 17) beside the fixed k, with mean kept blocks per row and the
share of rows capped at max-k (their max-k blocks held less than P).
``--ids`` runs only the named cases of the grid.
Prints a table and ends with one JSON line.

    python bench/niah_study.py --models smollm2-135m,gemma-3-270m --lengths 1k,2k,4k \
        --depths 0,25,50,75,100 --top-k dense,16,8,4,3 --budget-min 40
    python bench/niah_study.py --estimators stream,shortlist,oracle --variants niah_single_2,niah_multikey_1 \
        --depths 10,30,50,70,90 --samples 3 --top-k dense,8,4 --out bench/results/niah_search.json
    torchrun --standalone --nproc-per-node 8 bench/niah_study.py ... --device cuda   # 8 GPUs share the cases
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsetrace.config import TraceConfig
from sparsetrace.datasets import ruler as niah
from sparsetrace.errors import UsageError
from sparsetrace.runs.niah import case_log, case_results, comparisons, parse_depths, parse_top_k, split_list
from sparsetrace.runs.ranks import Ranks
from sparsetrace.tracing.models import load_model, resolve_folder

OUT = Path(__file__).parent / "results" / "niah.json"


def arrival_layer(route: dict) -> int | None:
    """The first layer after which the route sits on the answer block (how late retrieval happens)."""
    blocks = route["blocks"]
    if not blocks:
        return None
    answer = route["answer_block"]
    for i, b in enumerate(blocks):
        if b == answer:
            return i - 1  # edge i-1 (layer i-1) moved it there
    return None


def leave_layer(route: dict) -> int | None:
    """The last layer whose edge still starts in a needle block (where the needle is read)."""
    blocks, needle = route["blocks"], set(route["needle_blocks"])
    if not blocks:
        return None
    return max(i for i, b in enumerate(blocks[:-1]) if b in needle)


def forced(report: dict) -> bool:
    """Whether the needle sits in a sink or local block of the answer block (TraceConfig defaults:
    one sink block, one local block), from the report's own flag or its route."""
    if "needle_in_forced_blocks" in report:
        return report["needle_in_forced_blocks"]
    route = report["route"]
    return any(j < 1 or j >= route["answer_block"] for j in route["needle_blocks"])


def cell_label(estimator: str, k: int | str, estimators: list[str]):
    """The ``k`` field of a sparse cell (k, or ``P<p>`` for a coverage budget): the plain k when STREAM is the
    only selection (earlier results), else ``estimator:k``."""
    return k if estimators == ["stream"] else f"{estimator}:{k}"


def needle_kept_by_layer(reports: list[dict]) -> list[float]:
    """Per layer, the share of heads (over these cases) whose answer block keeps a needle block."""
    layers = len(reports[0]["needle_mass"])
    return [statistics.mean(sum(m > 0 for m in r["needle_mass"][layer]) / len(r["needle_mass"][layer])
                            for r in reports) for layer in range(layers)]


def summarize(rows: list[dict], reports: list[dict], ks) -> dict:
    out = {}
    models = sorted({r["model"] for r in rows})
    for m in models:
        for k in ks:
            sel = [r for r in rows if r["model"] == m and r["k"] == k]
            if not sel:
                continue
            key = f"{m}/k={k}"
            by_len = {}
            for n in sorted({r["length"] for r in sel}):
                cell = [r for r in sel if r["length"] == n]
                by_depth = {}
                for d in sorted({r["depth"] for r in cell}):
                    by_depth[str(d)] = statistics.mean(r["score"] for r in cell if r["depth"] == d)
                kept = [r["kept_blocks"] for r in cell if r.get("kept_blocks") is not None]  # older rows lack it
                capped = [r["capped_share"] for r in cell if r.get("capped_share") is not None]  # budgets only
                by_len[str(n)] = {"score": statistics.mean(r["score"] for r in cell),
                                  "sparsity": statistics.mean(r["sparsity"] for r in cell),
                                  "kept_blocks": statistics.mean(kept) if kept else None,
                                  "capped_share": statistics.mean(capped) if capped else None,
                                  "criterion": statistics.mean(float(r["criterion"]) for r in cell),
                                  "by_depth": by_depth, "n": len(cell)}
            out[key] = by_len
            if k == "dense":
                continue
            rep = [r for r in reports if r["model"] == m and r["k"] == k]
            for n in by_len:
                cell_reports = [r for r in rep if str(r["length"]) == n]
                if cell_reports:
                    by_len[n]["needle_kept_by_layer"] = [round(x, 3) for x in needle_kept_by_layer(cell_reports)]
                    dense_ok = [r for r in cell_reports if r["dense_score"] >= 1]
                    by_len[n]["answered_of_dense"] = [sum(r["score"] >= 1 for r in dense_ok), len(dense_ok)]
            for ok in (True, False):
                # Needles in a sink or local block draw mass whatever they hold: routes of those
                # cases say nothing about retrieval, so they are counted but left out.
                every = [r for r in rep if (r["score"] >= 1) == ok]
                grp = [r for r in every if not forced(r)]
                name = "success" if ok else "failure"
                arr = [a for a in (arrival_layer(r["route"]) for r in grp) if a is not None]
                lv = [a for a in (leave_layer(r["route"]) for r in grp) if a is not None]
                out[key][f"routes_{name}"] = {
                    "n": len(every),
                    "n_needle_in_forced_blocks": len(every) - len(grp),
                    "found": sum(1 for r in grp if r["route"]["blocks"]),
                    "mean_log_score": statistics.mean(r["route"]["score"] for r in grp
                                                      if r["route"]["score"] is not None)
                    if any(r["route"]["score"] is not None for r in grp) else None,
                    "mean_arrival_layer": statistics.mean(arr) if arr else None,
                    "mean_leave_layer": statistics.mean(lv) if lv else None,
                    "max_needle_mass": statistics.mean(max(r["needle_mass_max"]) for r in grp)
                    if grp else None,
                }
    return out


def todo(args, lengths, depths, done) -> list:
    """``(model, case)`` still to run: shortest first, every model, so a budget cut keeps a comparable grid.
    Tokenizers and context windows come without the weights, so every rank builds the same list."""
    from transformers import AutoConfig, AutoTokenizer

    grid, every_id = [], set()
    for length in lengths:
        for model_name in args.models.split(","):
            folder = resolve_folder(model_name)
            if length + 16 > int(AutoConfig.from_pretrained(folder).get_text_config().max_position_embeddings):
                continue
            tokenizer = AutoTokenizer.from_pretrained(folder)
            for variant in args.variants.split(","):
                cases = niah.make_cases(variant, tokenizer, [length], depths, samples=args.samples,
                                        seed=args.seed)
                every_id |= {c.id for c in cases}
                grid += [(model_name, c) for c in cases if (model_name, c.id) not in done
                         and (not args.ids or c.id in args.ids)]
    if args.ids - every_id:
        sys.exit(f"error: --ids names cases that are not in the grid of --variants, --lengths, --depths, "
                 f"--samples and --seed: {', '.join(sorted(args.ids - every_id))}; pass those options too.")
    return grid


def cells(args: argparse.Namespace) -> tuple[list, dict[str, TraceConfig]]:
    """The cells each case runs: ``"dense"`` (when asked) then the sparse labels, and the trace settings of
    each sparse label (every estimator at every fixed k, then at every coverage budget)."""
    ks = parse_top_k(args.top_k)
    estimators = args.estimators.split(",")
    common = {"block_size": args.block_size, "chunk_size": args.chunk_size, "audit_rate": 0}
    configs = {cell_label(e, k, estimators): TraceConfig.of(top_k=k, estimator=e, missed_samples=0, **common)
               for e in estimators for k in ks if k != "dense"}
    coverages = []
    for text in split_list(args.coverage):
        try:
            coverages.append(float(text))
        except ValueError:
            raise UsageError(f"--coverage value {text!r} is not a number; give shares like 0.9,0.95,0.99.") from None
    for e in estimators:  # a budget cuts its rows by the missed-mass estimate, so that stays on
        configs.update({cell_label(e, f"P{cov:g}", estimators): TraceConfig.of(
            top_k=args.max_k, coverage=cov, max_k=args.max_k, estimator=e, **common) for cov in coverages})
    return (["dense"] if "dense" in ks else []) + list(configs), configs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2-135m,gemma-3-270m")
    p.add_argument("--variants", default="niah_single_1,niah_single_2,niah_single_3")
    p.add_argument("--lengths", default="1k,2k,4k")
    p.add_argument("--depths", default="0,25,50,75,100")
    p.add_argument("--top-k", default="dense,16,8,4,3")
    p.add_argument("--estimators", default="stream", help="selections compared at each k (stream, "
                   "shortlist, oracle); the tracer's audit is off, it does not change the answer")
    p.add_argument("--coverage", default="", help="coverage budgets P beside the fixed k, e.g. 0.9,0.95,0.99: "
                   "each row keeps its fewest selected blocks whose estimated mass reaches P (docs/coverage.md)")
    p.add_argument("--max-k", type=int, default=64, help="with --coverage: key blocks a row keeps at most")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--ids", type=lambda text: set(filter(None, text.split(","))), default=set(),
                   help="run only these case ids of the grid (comma-separated), e.g. the cases the dense model "
                   "answered in an earlier run")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=1024, help="prefill tokens per forward (a multiple of the "
                   "block size); the selection does not depend on it, fewer and larger chunks run faster on a GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-min", type=float, default=40.0, help="stop starting new cells after this")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="run the models here (cpu, cuda)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--summary-only", action="store_true", help="re-summarize the JSON, run nothing")
    args = p.parse_args(argv)
    try:  # what the user got wrong is one line of argparse's, before any model loads
        ks, configs = cells(args)
        depths = parse_depths(args.depths)
        lengths = [niah.parse_length(t) for t in args.lengths.split(",")]
    except UsageError as err:
        p.error(str(err))
    with Ranks.from_env() as ranks:
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        data = json.loads(args.out.read_text()) if args.out.exists() else {"rows": [], "reports": []}
        done = {(r["model"], r["id"]) for r in data["rows"]}
        device = ranks.device(args.device)
        device_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
        grid = [] if args.summary_only else todo(args, lengths, depths, done)
        loaded: dict = {}

        def run_one(i: int) -> dict | None:
            model_name, case = grid[i]
            if (time.perf_counter() - start) / 60 > args.budget_min:
                print(f"{ranks.tag}budget reached; skipping {model_name} {case.id}", flush=True)
                return None  # not saved: a later run does it
            if model_name not in loaded:
                model, tokenizer = load_model(model_name)
                loaded[model_name] = model.to(device), tokenizer
            model, tokenizer = loaded[model_name]
            rows, reports = case_results(model, tokenizer, case, ks, configs, model_id=model_name)
            print(f"{ranks.tag}{model_name} {case_log(case, rows, i + 1, len(grid))}", flush=True)
            for r in rows + reports:
                r["model"] = model_name
                r["device"] = device_name
            for r in reports:  # keep the JSON small
                r["needle_mass"] = [[round(x, 4) for x in row] for row in r["needle_mass"]]
            return {"rows": rows, "reports": reports}

        def merge(results: list[dict]) -> None:
            for result in results:  # in grid order, whichever rank ran them
                data["rows"] += result["rows"]
                data["reports"] += result["reports"]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(data) + "\n")

        # one part file per case while the sweep runs: a killed run (any number of ranks) resumes
        settings = {"top_k": args.top_k, "block_size": args.block_size, "seed": args.seed,
                    "estimators": args.estimators, "coverage": args.coverage, "max_k": args.max_k}
        if not args.summary_only:
            ranks.sweep([f"{m}|{c.id}" for m, c in grid], run_one, args.out.with_suffix(".parts"),
                        merge=merge, settings=settings, log=print)
        if not ranks.main:
            return 0

    rows, reports = data["rows"], data["reports"]
    data["summary"] = summarize(rows, reports, ks)
    data["comparison"] = {m: comparisons([{**r, "needle_in_forced_blocks": forced(r)}
                                          for r in reports if r["model"] == m], ks)
                          for m in sorted({r["model"] for r in rows})}
    args.out.write_text(json.dumps(data) + "\n")

    print(f"\n{'model':<14}{'len':>6} {'k':>13} {'sparsity':>9} {'blocks':>7} {'capped':>7} {'crit':>5}  "
          f"score by depth {' '.join(f'{d:>5g}' for d in depths)}   mean")
    for key, by_len in data["summary"].items():
        model_name, k = key.split("/k=")
        for n, cell in by_len.items():
            if not n.isdigit():
                continue
            dep = " ".join(f"{cell['by_depth'].get(str(d), math.nan):5.2f}" for d in depths)
            blocks = "" if cell.get("kept_blocks") is None else f"{cell['kept_blocks']:.1f}"
            capped = "" if cell.get("capped_share") is None else f"{cell['capped_share']:.3f}"
            print(f"{model_name:<14}{n:>6} {k:>13} {cell['sparsity']:9.3f} {blocks:>7} {capped:>7} "
                  f"{cell['criterion']:5.2f}                {dep}   {cell['score']:.2f}")
    for m, comp in data["comparison"].items():
        for k, sep in comp.items():
            if sep["top"]:
                best = sep["top"][0]
                print(f"{m} k={k}: {sep['num_success']} answered / {sep['num_failure']} failed; best "
                      f"separating head L{best['layer']}H{best['head']} AUC {best['auc']:.2f} "
                      f"(mass {best['mean_success']:.3f} vs {best['mean_failure']:.3f})")
    print(json.dumps({"bench": "niah_study", "cells": len(rows), "ranks": ranks.world, "wall_s":
                      round(time.perf_counter() - start, 1), "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
