"""How large SHORTLIST's shortlist must be to keep the needles the exact oracle keeps, on real Q/K of NIAH cases.

For each RULER case (SmolLM2-135M unless ``--model`` names another, block 32), one dense forward captures every
layer's post-RoPE q and k. Then, for k in {4, 8}, each selection picks the answer block's key blocks (the last
query block) in every layer and head: the oracle, STREAM, and SHORTLIST with C = c × the default
``m * max(L, 2)`` for c in {1, 2, 4}. We count the (layer, head) pairs whose answer block keeps a needle
block. It measures the search alone: no decoding, no RULER score (bench/niah_study.py has those).

``--measure needle-rank`` asks where the needle is lost, in the prefill rows that read the haystack: the
query blocks after the needle's and before the input's exact tail (``EXACT_TAIL``; the tail's rows are the
oracle's, so a rank there says nothing). In every layer, query head and such row it ranks the needle's key
block among the row's middle candidates by SHORTLIST's pre-score (1 = best, ties to the lower block) and
by the exact block score, against the row's C and m. A row whose needle ranks within m exactly but beyond
C by pre-score is a pre-score miss (a larger C or a better pre-score would keep it); a needle ranked past m
exactly is lost to the budget, which no shortlist fixes. Per k (3, 4, 8, 16) and layer: the share of rows
whose needle reaches the shortlist, the median and p90 of pre-score rank / C, and the pre-score misses (also
at 2, 4 and 8 times C). ``--prescore`` ranks by another step-2 variant (bench/prescore_variants.py's for
every row, or bench/niah_prescore.py's bound), ``--layers`` keeps some layers only.

    python bench/shortlist_size.py [--measure size|needle-rank] [--variants niah_single_2,niah_single_3,
        niah_multikey_1] [--lengths 2048] [--depths 10,50,90] [--ks 4,8]
        [--json bench/results/shortlist_size.json | bench/results/needle_rank.json]
        [--model smollm2-135m] [--samples 1] [--ids ID,...] [--layers 5,11] [--prescore z3|khalves|q8grp|quest]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
from pathlib import Path

import long_rows  # sibling bench scripts: the merge of two pre-scores, Quest's bound as step 2
import niah_prescore
import torch

from sparsetrace import MaskConfig, load_model
from sparsetrace.analysis.routes import needle_blocks
from sparsetrace.datasets import ruler
from sparsetrace.runs.niah import encode
from sparsetrace.selection.blocks import candidate_range, forced_sinks, in_middle, query_blocks
from sparsetrace.selection.oracle import block_scores, oracle_select
from sparsetrace.selection.shortlist import (
    Z,
    exact_tail_blocks,
    pool_keys,
    pool_queries,
    pre_scores,
    shortlist_select,
    shortlist_sizes,
)
from sparsetrace.selection.stream import stream_select
from sparsetrace.tracing.probe import capture_qk

BLOCK = 32
MULTIPLES = (1, 2, 4)
DEFAULT_KS = {"size": "4,8", "needle-rank": "3,4,8,16"}
DEFAULT_JSON = {"size": "bench/results/shortlist_size.json", "needle-rank": "bench/results/needle_rank.json"}


def selections(q, k, config: MaskConfig, scale: float, window) -> dict[str, torch.Tensor]:
    """Indices ``[1, H, nQ, top_k]`` of each selection on one layer's q ``[H, T, D]``, k ``[Hkv, T, D]``."""
    q1, k1 = q[None], k[None]
    out = {"oracle": oracle_select(q1, k1, config, scale=scale, window=window).indices,
           "stream": stream_select(q1, k1, config, scale=scale, window=window).indices}
    m = config.top_k - config.sink_blocks - config.local_blocks
    count = torch.tensor([math.ceil(q.shape[1] / BLOCK) - config.sink_blocks - config.local_blocks])
    default = int(shortlist_sizes(count, m))  # C of the answer block, the last one
    for c in MULTIPLES:
        out[f"shortlist C x{c}"] = shortlist_select(q1, k1, config, scale=scale, window=window,
                                                    size=c * default).indices
    return out


def needle_rank(scores: torch.Tensor, needles: list[int], middle: torch.Tensor) -> torch.Tensor:
    """Rank (1 = best) of each needle block among each row's middle candidates, ``scores [H, R, nKB]`` and
    bool ``middle [R, nKB]`` -> ``[len(needles), H, R]``. Ties go to the lower block, as SHORTLIST's
    ``top_columns`` and the oracle's stable sort break them, so rank <= C means the shortlist holds it."""
    scores = scores.masked_fill(~middle, -math.inf)
    ids = torch.arange(scores.shape[-1])
    ranks = []
    for j in needles:
        own = scores[..., j:j + 1]  # [H, R, 1]
        ahead = (scores > own) | ((scores == own) & (ids < j))  # [H, R, nKB]
        ranks.append(ahead.sum(-1) + 1)
    return torch.stack(ranks)


PRESCORES = ("z3", "khalves", "q8grp", "quest", "merge")
WIDTHS = (1, 2, 4, 8)  # shortlist sizes, in multiples of the default C, at which pre-score misses are counted


def variant_pre_scores(prescore: str, q: torch.Tensor, k: torch.Tensor, q_used: torch.Tensor,
                       rows: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:
    """Step 2's pre-score of query blocks ``rows`` of q ``[H, T, D]`` against every key block of k
    ``[Hkv, S, D]``: ``[H, R, nKB]``. ``z3`` is the library's (``selection.shortlist.pre_scores``); the others
    are bench/prescore_variants.py's, here for every row: ``khalves`` pools keys per half block and takes the
    better half, ``q8grp`` pools the block's queries in 8 groups and takes the best group, ``quest`` is
    Quest's per-channel bound ``sum_d max(qsum_d kmax_d, qsum_d kmin_d)`` (arXiv 2406.10774), as
    bench/niah_prescore.py computes it; ``merge`` ranks a block by its better rank under z3 and quest among
    the row's middle candidates ``middle [R, nKB]`` (bench/long_rows.py)."""
    H, n_kb = q.shape[0], math.ceil(k.shape[1] / BLOCK)
    q_sum = pool_queries(q[None], q_used)[:, :, rows]  # [1, H, R, D]
    if prescore == "z3":
        return pre_scores(q_sum, *pool_keys(k[None], BLOCK), Z)[0]
    if prescore == "khalves":
        halves = pre_scores(q_sum, *pool_keys(k[None], BLOCK // 2), Z)[0]  # [H, R, 2 nKB or one less]
        halves = torch.nn.functional.pad(halves, (0, 2 * n_kb - halves.shape[-1]), value=-math.inf)
        return halves.view(H, len(rows), n_kb, 2).amax(-1)
    if prescore == "q8grp":  # pool_queries over groups of bq / 8 used rows: each block's 8 group sums
        groups = 8
        nQ, bq = q_used.shape
        q_groups = pool_queries(q[None], q_used.reshape(nQ * groups, bq // groups))  # [1, H, nQ * 8, D]
        q_groups = q_groups.view(1, H, nQ, groups, -1)[:, :, rows].flatten(2, 3)  # [1, H, R * 8, D]
        scores = pre_scores(q_groups, *pool_keys(k[None], BLOCK), Z)[0]
        return scores.view(H, len(rows), groups, n_kb).amax(2)
    if prescore == "quest":
        return niah_prescore.bound_scores(q_sum, *niah_prescore.pool_key_bounds(k[None], BLOCK))[0]
    if prescore == "merge":
        return long_rows.merged_scores(*long_rows.prescore_ranks(q_sum, k, middle))
    raise ValueError(f"unknown pre-score {prescore!r}; choose one of {', '.join(PRESCORES)}")


def needle_ranks(q: torch.Tensor, k: torch.Tensor, scale: float, window: int | None, needles: list[int],
                 ks: list[int], prescore: str = "z3") -> dict[int, dict[str, torch.Tensor]]:
    """Per k, the needle's ranks on one layer's q ``[H, T, D]``, k ``[Hkv, T, D]``: ``pre`` (by the
    ``prescore`` variant) and ``exact`` ``[H, R]`` over the R searched rows after the needle and before the
    exact tail, with their ``C`` and ``m`` (``[R]`` and an int). The pre-scores and exact scores do not
    depend on k; only C and m do."""
    config = MaskConfig(block_q=BLOCK, block_k=BLOCK)
    T, S = q.shape[1], k.shape[1]
    sinks = forced_sinks(config, window)
    lo, n = candidate_range(T, S, config, q.device, window)  # [nQ] each
    middle = in_middle(torch.arange(math.ceil(S / BLOCK))[None, :], lo, n, sinks, config)  # [nQ, nKB]
    body = math.ceil(T / BLOCK) - exact_tail_blocks(T, S, BLOCK)  # query blocks before the tail
    # rows where every needle block is a middle candidate: past the needle's blocks and their locals
    rows = torch.tensor([i for i in range(body) if bool(middle[i, needles].all())], dtype=torch.long)
    count = torch.clamp(n - lo - sinks - config.local_blocks, min=0)[rows]  # [R] middle candidates
    _, _, q_used = query_blocks(q[None, :1, :, :1], config, S)  # [nQ, bq]: depends on T, S only
    pre = needle_rank(variant_pre_scores(prescore, q, k, q_used, rows, middle[rows]), needles, middle[rows])
    exact_scores = block_scores(q[None], k[None], config, scale=scale, window=window)[0, :, rows]  # [H, R, nKB]
    exact = needle_rank(exact_scores, needles, middle[rows])  # [N, H, R]
    # a needle over two blocks: each row ranks the block the exact score ranks best (the one the oracle
    # keeps first), so "exact rank <= m, pre-score rank > C" is one block the shortlist drops
    best = exact.argmin(0, keepdim=True)  # [1, H, R]
    pre, exact = pre.gather(0, best)[0], exact.gather(0, best)[0]  # [H, R] each
    out = {}
    for top_k in ks:
        m = top_k - sinks - config.local_blocks
        searched = count > m  # other rows keep every candidate (n <= top_k): nothing to rank
        out[top_k] = {"pre": pre[:, searched], "exact": exact[:, searched], "m": m,
                      "C": shortlist_sizes(count[searched], m)}
    return out


def rank_summary(pre: torch.Tensor, exact: torch.Tensor, C: torch.Tensor, m: int) -> dict:
    """Flat ``pre``, ``exact`` ranks and ``C`` of some rows -> the table's numbers for them."""
    if not len(pre):  # e.g. a needle in the tail: no row to rank it in
        return {"rows": 0}
    ratio = pre.double() / C.double()
    median, p90 = torch.quantile(ratio, torch.tensor([0.5, 0.9], dtype=torch.double)).tolist()
    return {"rows": len(pre), "reach_share": round(float((pre <= C).double().mean()), 4),
            "median_rank_over_C": round(median, 4), "p90_rank_over_C": round(p90, 4),
            "oracle_keeps": int((exact <= m).sum()),  # exact rank <= m: the oracle keeps the needle here
            "prescore_misses": int(((exact <= m) & (pre > C)).sum()),
            "prescore_misses_by_width": {f"{w}C": int(((exact <= m) & (pre > w * C)).sum()) for w in WIDTHS},
            "budget_misses": int((exact > m).sum())}


def needle_rank_study(model, tokenizer, cases, ks: list[int], model_name: str = "smollm2-135m",
                      prescore: str = "z3", layers: set[int] | None = None) -> dict:
    """``--measure needle-rank``: the needle's pre-score and exact ranks on every case (module docstring)."""
    ranks = collections.defaultdict(lambda: {"pre": [], "exact": [], "C": []})  # (k, layer) -> per case
    m_of = {}
    per_case = []
    for case in cases:
        needles = needle_blocks(case.needle_token_spans, BLOCK)
        row = {"id": case.id, "needle_blocks": needles}
        for layer, (q, k, scale, window) in capture_qk(model, encode(tokenizer, case)).items():
            if layers and layer not in layers:
                continue
            for top_k, r in needle_ranks(q, k, scale, window, needles, ks, prescore).items():
                cell = ranks[(top_k, layer)]
                cell["pre"].append(r["pre"].flatten())
                cell["exact"].append(r["exact"].flatten())
                cell["C"].append(r["C"].expand_as(r["pre"]).flatten())  # [H, R]: one C per row, every head
                m_of[top_k] = r["m"]
                row[f"reach k{top_k}"] = row.get(f"reach k{top_k}", 0) + int((r["pre"] <= r["C"]).sum())
                row[f"rows k{top_k}"] = row.get(f"rows k{top_k}", 0) + r["pre"].numel()
        per_case.append(row)
        print(row, flush=True)
    layers = sorted({layer for _, layer in ranks})
    rows = []
    for top_k in ks:
        every = {key: [] for key in ("pre", "exact", "C")}
        for layer in layers:
            cell = {key: torch.cat(v) for key, v in ranks[(top_k, layer)].items()}
            rows.append({"k": top_k, "layer": layer, **rank_summary(**cell, m=m_of[top_k])})
            for key in every:
                every[key].append(cell[key])
        rows.append({"k": top_k, "layer": "all",
                     **rank_summary(**{key: torch.cat(v) for key, v in every.items()}, m=m_of[top_k])})
    print(f"\n{model_name}, {len(cases)} cases: the needle's key block in the rows between the needle and the "
          "exact tail. Each cell: share of rows whose needle reaches the shortlist (pre-score rank <= C), "
          "median / p90 of pre-score rank / C, pre-score misses / rows the oracle keeps it")
    print("| layer | " + " | ".join(f"k {top_k}" for top_k in ks) + " |")
    print("|---:|" + "---:|" * len(ks))
    by_key = {(r["k"], r["layer"]): r for r in rows}
    for layer in [*layers, "all"]:
        cells = [by_key[(top_k, layer)] for top_k in ks]
        print(f"| {layer} | " + " | ".join(
            f"{c['reach_share']:.3f} {c['median_rank_over_C']:.2f}/{c['p90_rank_over_C']:.2f} "
            f"{c['prescore_misses']}/{c['oracle_keeps']}" if c["rows"] else "-" for c in cells) + " |")
    return {"bench": "needle_rank", "model": model_name, "prescore": prescore, "block": BLOCK, "z": Z,
            "cases": len(cases), "rows": rows, "per_case": per_case}


def size_study(model, tokenizer, cases, ks: list[int], model_name: str = "smollm2-135m") -> dict:
    """The default measure: (layer, head) pairs whose answer block keeps a needle, per selection."""
    kept = collections.Counter()  # (k, selection) -> (layer, head) pairs keeping a needle block
    pairs = 0
    per_case = []
    for case in cases:
        layers = capture_qk(model, encode(tokenizer, case))
        needles = set(needle_blocks(case.needle_token_spans, BLOCK))
        row = {"id": case.id}
        for top_k in ks:
            config = MaskConfig(block_q=BLOCK, block_k=BLOCK, top_k=top_k)
            for q, k, scale, window in layers.values():
                for name, indices in selections(q, k, config, scale, window).items():
                    hits = sum(bool(needles & set(r)) for r in indices[0, :, -1].tolist())
                    kept[(top_k, name)] += hits
                    row[f"{name} k{top_k}"] = row.get(f"{name} k{top_k}", 0) + hits
        pairs += sum(q.shape[0] for q, *_ in layers.values())
        per_case.append(row)
        print(row, flush=True)
    print(f"\n{model_name}, {len(cases)} cases, {pairs} (layer, head) pairs per k: pairs whose answer block "
          "keeps a needle block")
    print("| k | selection | pairs keeping the needle | share of the oracle's |")
    print("|---:|---|---:|---:|")
    rows = []
    for (top_k, name), n in sorted(kept.items()):
        share = n / kept[(top_k, "oracle")]
        rows.append({"k": top_k, "selection": name, "needle_kept": n, "share_of_oracle": round(share, 4)})
        print(f"| {top_k} | {name} | {n} | {share:.3f} |")
    return {"bench": "shortlist_size", "model": model_name, "block": BLOCK, "cases": len(cases),
            "pairs_per_k": pairs, "rows": rows, "per_case": per_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", choices=("size", "needle-rank"), default="size")
    parser.add_argument("--variants", default="niah_single_2,niah_single_3,niah_multikey_1")
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--depths", default="10,50,90")
    parser.add_argument("--ks", default=None, help="default 4,8 (size) or 3,4,8,16 (needle-rank)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=1, help="RULER samples per cell (seed 0)")
    parser.add_argument("--ids", default="", help="only these case ids of the grid, comma-separated")
    parser.add_argument("--prescore", choices=PRESCORES, default="z3", help="needle-rank: step 2's variant")
    parser.add_argument("--layers", default="", help="needle-rank: only these layers, comma-separated")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"default {' or '.join(DEFAULT_JSON.values())}")
    args = parser.parse_args()
    ks = [int(x) for x in (args.ks or DEFAULT_KS[args.measure]).split(",")]
    out = args.json or Path(DEFAULT_JSON[args.measure])
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    cases = ruler.make_cases(args.variants.split(","), tokenizer, [int(x) for x in args.lengths.split(",")],
                             [float(x) for x in args.depths.split(",")], samples=args.samples, seed=0)
    ids = set(filter(None, args.ids.split(",")))
    cases = [c for c in cases if not ids or c.id in ids]
    if args.measure == "needle-rank":
        layers = {int(x) for x in args.layers.split(",") if x}
        result = needle_rank_study(model, tokenizer, cases, ks, args.model, args.prescore, layers)
    else:
        result = size_study(model, tokenizer, cases, ks, args.model)
    result["seconds"] = round(time.perf_counter() - start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
