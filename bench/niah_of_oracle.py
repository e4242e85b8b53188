"""Of the NIAH cases the exact block top-k (the oracle) answers at k, how many a selection answers at the same k.

Reads bench/niah_study.py JSON files: ``--reference`` holds the oracle's cells (``oracle:<k>``), ``--selection``
the compared selection's (``<estimator>:<k>``, or plain ``<k>`` when STREAM ran alone); the two may be the
same files or runs of the same cases at another time (cases are matched by id). Each argument is a folder of
JSON files or one file; several, comma-separated and paired in order, pool their counts (case ids do not
name the seed, so runs of other seeds are kept apart this way). Prints one row per k and the total, with
the cases missed, and ends with one JSON line.

    python bench/niah_of_oracle.py --reference bench/results/niah_search_tail64/seed1 \
        --selection bench/results/niah_search_tail64/seed1 --estimator shortlist
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load_cells(path: Path) -> dict[str, dict[str, dict]]:
    """``{case id: {cell label: row}}`` from one niah_study JSON, or every one in a folder."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    cells: dict[str, dict[str, dict]] = {}
    for f in files:
        for row in json.loads(f.read_text())["rows"]:
            cells.setdefault(row["id"], {})[str(row["k"])] = row
    return cells


def of_oracle(runs: list[tuple[dict, dict]], estimator: str, k: int) -> dict:
    """Counts at one k over the cases both runs of each ``(reference, selection)`` pair hold, pooled over the
    pairs: the oracle's answered cases, the selection's among them, the ids it misses (prefixed by the pair's
    index when there are several), and the selection's mean block sparsity over all its cases at k."""
    def cell(case: dict) -> dict | None:
        return case.get(f"{estimator}:{k}") or (case.get(str(k)) if estimator == "stream" else None)

    answered, oracle_cases, missed, sparsity = 0, 0, [], []
    for i, (reference, selection) in enumerate(runs):
        for case_id, ref in reference.items():
            mine = cell(selection.get(case_id, {}))
            if mine is None:
                continue
            sparsity.append(mine["sparsity"])
            oracle = ref.get(f"oracle:{k}")
            if oracle is None or oracle["score"] < 1:
                continue
            oracle_cases += 1
            if mine["score"] >= 1:
                answered += 1
            else:
                missed.append(f"{i}:{case_id}" if len(runs) > 1 else case_id)
    return {"k": k, "answered": answered, "oracle_answered": oracle_cases,
            "sparsity": statistics.mean(sparsity) if sparsity else None, "missed": sorted(missed)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, help="niah_study JSON (files or folders) with the oracle's cells")
    p.add_argument("--selection", required=True, help="niah_study JSON (files or folders) with the selection's")
    p.add_argument("--estimator", default="shortlist", help="the compared selection (shortlist, stream)")
    p.add_argument("--top-k", default="3,4,8,16")
    args = p.parse_args(argv)
    references, selections = args.reference.split(","), args.selection.split(",")
    if len(references) != len(selections):
        raise SystemExit("--reference and --selection need as many comma-separated paths each (paired in order).")
    runs = [(load_cells(Path(r)), load_cells(Path(s))) for r, s in zip(references, selections, strict=True)]
    rows = [of_oracle(runs, args.estimator, k) for k in map(int, args.top_k.split(","))]
    print(f"{'k':>3} {'sparsity':>9} {args.estimator + ' / oracle answered':>28}   missed")
    for r in rows:
        share = r["answered"] / r["oracle_answered"] if r["oracle_answered"] else float("nan")
        sparsity = "" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
        print(f"{r['k']:>3} {sparsity:>9} {r['answered']:>14} / {r['oracle_answered']:<3} ({share:6.1%})   "
              f"{' '.join(r['missed'])}")
    total = [sum(r["answered"] for r in rows), sum(r["oracle_answered"] for r in rows)]
    print(f"all {'':>9} {total[0]:>14} / {total[1]:<3} ({total[0] / max(total[1], 1):6.1%})")
    print(json.dumps({"bench": "niah_of_oracle", "estimator": args.estimator, "rows": rows, "total": total}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
