"""Which pre-score keeps the oracle's needle in SHORTLIST's shortlist: variants of step 2, answer block only.

SHORTLIST (``selection.shortlist``) pre-scores every candidate block from pooled keys and rescores the best
C exactly. On NIAH cases its default pre-score (``qsum . kbar + 3 sqrt(qsum^2 . var)``) leaves the needle's
block off the shortlist in 14 % of the (layer, head) pairs where the oracle keeps it at k 4
(bench/shortlist_size.py). This bench tries other pre-scores on the same real Q/K (SmolLM2-135M, block 32,
one dense forward per case, the last query block, sinks 1 and locals 1) and counts the pairs whose final
selection (the m best exact scores among the shortlist) keeps a needle block, at C = the default size and
twice it:

- ``z2``, ``z3`` (the library's), ``z4``: the weight of the pooled standard deviation;
- ``q4grp``, ``q8grp``: the query block split into 4 (8) groups, each pooled, the best group's pre-score
  (costs 4x (8x) the pre-score's multiply-adds);
- ``khalves``: keys pooled per half block, the better half (2x);
- ``lastq``: the block's pooled pre-score or the last query's alone, whichever is larger (2x);
- ``quest``: Quest's per-channel bound ``sum_d max(qsum_d kmax_d, qsum_d kmin_d)`` (arXiv 2406.10774).

    python bench/prescore_variants.py [--lengths 2048] [--depths 10,50,90]
        [--variants niah_single_2,niah_single_3,niah_multikey_1] [--json bench/results/prescore_variants.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
from pathlib import Path

import torch

from sparsetrace import load_model
from sparsetrace.analysis.routes import needle_blocks
from sparsetrace.datasets import ruler
from sparsetrace.runs.niah import encode
from sparsetrace.selection.shortlist import shortlist_sizes
from sparsetrace.tracing.probe import capture_qk

BLOCK = 32


def pooled(x: torch.Tensor, size: int):
    """Per group of ``size`` rows of ``x [H, T, D]``: mean, variance, max and min over the real rows."""
    H, T, D = x.shape
    n = math.ceil(T / size)
    rows = torch.nn.functional.pad(x, (0, 0, 0, n * size - T)).view(H, n, size, D)
    real = torch.clamp(T - torch.arange(n) * size, max=size)
    present = (torch.arange(size)[None, :] < real[:, None])[None, :, :, None]  # [1, n, size, 1]
    mean = rows.sum(2) / real.float()[:, None]
    var = (rows.square().sum(2) / real.float()[:, None] - mean.square()).clamp(min=0)
    return mean, var, torch.where(present, rows, -math.inf).amax(2), torch.where(present, rows, math.inf).amin(2)


def pre_score(q_groups: torch.Tensor, k_mean: torch.Tensor, k_var: torch.Tensor, z: float) -> torch.Tensor:
    """``[H, G, D]`` pooled query groups against ``[H, n, D]`` key stats: the best group's score ``[H, n]``."""
    spread = (q_groups.square() @ k_var.transpose(-1, -2)).clamp(min=0).sqrt()
    return (q_groups @ k_mean.transpose(-1, -2) + z * spread).amax(1)


def variants(q_answer: torch.Tensor, k: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """Every pre-score of the answer block's queries ``[H, bq, D]`` against the key blocks: ``[H, n]`` each."""
    H, _, D = q_answer.shape
    q_full = torch.nn.functional.pad(q_answer, (0, 0, 0, BLOCK - q_answer.shape[1]))
    k_mean, k_var, k_max, k_min = pooled(k, BLOCK)
    half_mean, half_var, _, _ = pooled(k, BLOCK // 2)
    q_sum = q_full.sum(1, keepdim=True)
    out = {f"z{z}": pre_score(q_sum, k_mean, k_var, z) for z in (2, 3, 4)}
    for groups in (4, 8):
        out[f"q{groups}grp"] = pre_score(q_full.view(H, groups, BLOCK // groups, D).sum(2), k_mean, k_var, 3)
    halves = pre_score(q_sum, half_mean, half_var, 3)
    halves = torch.nn.functional.pad(halves, (0, 2 * n - halves.shape[1]), value=-math.inf)
    out["khalves"] = halves.view(H, n, 2).amax(-1)
    out["lastq"] = torch.maximum(out["z3"] / BLOCK, pre_score(q_answer[:, -1:], k_mean, k_var, 3))
    out["quest"] = torch.maximum(q_sum * k_max, q_sum * k_min).sum(-1)
    return out


def needle_hits(picks: torch.Tensor, middle: torch.Tensor, needles: set[int]) -> int:
    """Rows of ``picks [H, m]`` (positions in ``middle``) that keep a needle block."""
    return sum(bool(needles & set(row)) for row in middle[picks].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="niah_single_2,niah_single_3,niah_multikey_1")
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--depths", default="10,50,90")
    parser.add_argument("--json", type=Path, default=Path("bench/results/prescore_variants.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    cases = ruler.make_cases(args.variants.split(","), tokenizer, [int(x) for x in args.lengths.split(",")],
                             [float(x) for x in args.depths.split(",")], samples=1, seed=0)
    kept = collections.Counter()  # (k, selection) -> (layer, head) pairs whose answer block keeps a needle
    for case in cases:
        needles = set(needle_blocks(case.needle_token_spans, BLOCK))
        for q, k, _, _ in capture_qk(model, encode(tokenizer, case)).values():
            k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
            n = math.ceil(q.shape[1] / BLOCK)
            q_answer = q[:, (n - 1) * BLOCK:]
            exact = torch.stack([(q_answer @ k[:, j * BLOCK:(j + 1) * BLOCK].mT).amax((-1, -2))
                                 for j in range(n)], -1)
            middle = torch.arange(1, n - 1)  # one sink block, one local block
            scores = {name: s[:, middle] for name, s in variants(q_answer, k, n).items()}
            exact = exact[:, middle]
            for top_k in (4, 8):
                m = top_k - 2
                size = int(shortlist_sizes(torch.tensor([len(middle)]), m))
                kept[(top_k, "oracle")] += needle_hits(torch.topk(exact, m, -1).indices, middle, needles)
                for name, s in scores.items():
                    for mult in (1, 2):
                        short = torch.topk(s, min(mult * size, len(middle)), -1).indices
                        best = short.gather(-1, torch.topk(exact.gather(-1, short), m, -1).indices)
                        kept[(top_k, f"{name} C x{mult}")] += needle_hits(best, middle, needles)
        print(case.id, f"{time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    print("| k | pre-score | C | pairs keeping the needle | share of the oracle's |")
    print("|---:|---|---:|---:|---:|")
    for (top_k, name), hits in sorted(kept.items()):
        if name != "oracle":
            share = hits / kept[(top_k, "oracle")]
            rows.append({"k": top_k, "selection": name, "needle_kept": hits, "oracle": kept[(top_k, "oracle")],
                         "share_of_oracle": round(share, 4)})
            print(f"| {top_k} | {name} | {hits} | {share:.3f} |")
    result = {"bench": "prescore_variants", "model": "smollm2-135m", "block": BLOCK, "cases": len(cases),
              "rows": rows, "seconds": round(time.perf_counter() - start, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
